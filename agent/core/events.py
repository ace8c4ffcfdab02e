"""Device → host messages: events on `evt`, the retained `state` and periodic `telemetry`.

Every message a device sends carries `device`, `ts` and a per-device `seq` so the host can detect gaps
(after an agent restart the sequence jumps forward; the retained `state` birth message marks that). The
Last Will is a `state` without `seq` saying the device is offline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Mapping, Optional, Tuple, Type, TypeVar

from edgefleet.agent.core.codes import Code
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.parts import (
    Latency,
    ModelRef,
    Requests,
    SystemMetrics,
    legacy_parts,
    quality_from_obj,
)
from edgefleet.agent.core.quality import Quality
from edgefleet.agent.core.wire import (
    DEFAULT_MAX_CONTROL_BYTES,
    SCHEMA_VERSION,
    check_version,
    decode_json,
    encode_json,
    get_bool,
    get_dict,
    get_int,
    get_list,
    get_num,
    get_sha,
    get_str,
    get_strs,
    opt_int,
    part_or_none,
    split_extra,
    wire_class,
)

M = TypeVar("M", bound="DeviceMessage")
T = TypeVar("T")
# Envelope of a device message: keys no subclass may use for a field of its own.
DEVICE_ENVELOPE = frozenset({"v", "type", "device", "seq", "ts"})


@dataclass(frozen=True)
class DeviceMessage:
    """Base of messages a device sends: who, when, and the per-device sequence number."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = SCHEMA_VERSION
    KEYS: ClassVar[FrozenSet[str]] = frozenset()
    device: str
    seq: int
    ts: float
    # Keys a newer agent added that this side does not know: kept, and sent on by to_wire.
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {}

    def to_obj(self) -> Dict[str, Any]:
        """Plain JSON object."""
        return {
            **self.extra,
            "v": self.VERSION,
            "type": self.TYPE,
            "device": self.device,
            "seq": self.seq,
            "ts": self.ts,
            **self._fields(),
        }

    def to_wire(self) -> bytes:
        """Encode as a JSON payload."""
        return encode_json(self.to_obj())

    @classmethod
    def from_wire(cls: Type[M], payload: bytes) -> M:
        """Decode a payload that must be this kind of message."""
        message = parse_device_message(payload)
        if not isinstance(message, cls):
            raise ProtocolError(Code.UNKNOWN_TYPE, f"expected a {cls.TYPE!r} message, got {message.TYPE!r}")
        return message

    @classmethod
    def _parse(cls: Type[M], obj: Mapping[str, Any], base: Dict[str, Any]) -> M:
        return cls(**base)


@wire_class
@dataclass(frozen=True)
class Error(DeviceMessage):
    """Something the device received or tried failed; `code` is stable, `reason` says what to do."""

    TYPE: ClassVar[str] = "error"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"code", "reason", "ref"})
    code: str = Code.INTERNAL
    reason: str = ""
    ref: Optional[str] = None

    def _fields(self) -> Dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "ref": self.ref}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Error:
        return cls(
            **base,
            code=get_str(obj, "code", max_len=64),
            reason=get_str(obj, "reason", max_len=1 << 16),
            ref=get_str(obj, "ref", optional=True, max_len=1024),
        )


@wire_class
@dataclass(frozen=True)
class Progress(DeviceMessage):
    """A deployment reached a step (an `InstallStep`: verify-manifest, download, verify, write, ...)."""

    TYPE: ClassVar[str] = "progress"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"deploy", "step", "detail"})
    deploy: str = ""
    step: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "step": self.step, "detail": self.detail}

    def chunk_counts(self) -> Tuple[Optional[int], Optional[int]]:
        """(chunks the device already holds, chunks in all) from a `download` step's detail; None if absent."""
        counts = [self.detail.get(k) for k in ("have", "chunks")]
        have, total = (v if isinstance(v, int) and not isinstance(v, bool) else None for v in counts)
        return have, total

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Progress:
        return cls(
            **base,
            deploy=get_str(obj, "deploy", max_len=128),
            step=get_str(obj, "step", max_len=64),
            detail=get_dict(obj, "detail", optional=True),
        )


@wire_class
@dataclass(frozen=True)
class Missing(DeviceMessage):
    """Chunk ranges (inclusive `[start, end]`) of one file the device still needs: resend on repair."""

    TYPE: ClassVar[str] = "missing"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"deploy", "sha256", "ranges"})
    deploy: str = ""
    sha256: str = ""
    ranges: Tuple[Tuple[int, int], ...] = ()

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "sha256": self.sha256, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Missing:
        ranges = []
        for item in get_list(obj, "ranges"):
            if (
                not isinstance(item, list)
                or len(item) != 2
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in item)
                or item[0] > item[1]
            ):
                raise ProtocolError(
                    Code.BAD_FIELD, "field 'ranges' must list [start, end] pairs, start <= end"
                )
            ranges.append((item[0], item[1]))
        return cls(
            **base,
            deploy=get_str(obj, "deploy", max_len=128),
            sha256=get_sha(obj, "sha256"),
            ranges=tuple(ranges),
        )


@wire_class
@dataclass(frozen=True)
class Deployed(DeviceMessage):
    """A deployment ended with the new model serving; `health` is the health check's report."""

    TYPE: ClassVar[str] = "deployed"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"deploy", "name", "version", "health"})
    deploy: str = ""
    name: str = ""
    version: int = 0
    health: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "name": self.name, "version": self.version, "health": self.health}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Deployed:
        return cls(
            **base,
            deploy=get_str(obj, "deploy", max_len=128),
            name=get_str(obj, "name", max_len=256),
            version=get_int(obj, "version"),
            health=get_dict(obj, "health", optional=True),
        )


@wire_class
@dataclass(frozen=True)
class Rejected(DeviceMessage):
    """A deployment failed at `step`; the old model keeps serving."""

    TYPE: ClassVar[str] = "rejected"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"deploy", "step", "code", "reason"})
    deploy: str = ""
    step: str = ""
    code: str = ""
    reason: str = ""

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "step": self.step, "code": self.code, "reason": self.reason}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Rejected:
        return cls(
            **base,
            deploy=get_str(obj, "deploy", max_len=128),
            step=get_str(obj, "step", max_len=64),
            code=get_str(obj, "code", max_len=64),
            reason=get_str(obj, "reason", max_len=1 << 16),
        )


@wire_class
@dataclass(frozen=True)
class Result(DeviceMessage):
    """The answer to a command other than deploy (rollback, eval, status, config, infer, rotate-root)."""

    TYPE: ClassVar[str] = "result"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"ref", "command", "data"})
    ref: str = ""
    command: str = ""
    data: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"ref": self.ref, "command": self.command, "data": self.data}

    def rotation(self) -> Tuple[bool, Optional[int]]:
        """A `rotate-root` answer: (whether the device moved to the new root, its root version now)."""
        version = self.data.get("root_version")
        exact = isinstance(version, int) and not isinstance(version, bool)
        return bool(self.data.get("applied")), version if exact else None

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Result:
        return cls(
            **base,
            ref=get_str(obj, "ref", max_len=128),
            command=get_str(obj, "command", max_len=64),
            data=get_dict(obj, "data", optional=True),
        )


def _lenient(obj: Mapping[str, Any], key: str, read: Callable[[], T], kept: Dict[str, Any]) -> Optional[T]:
    """`read()`, or None with the raw value kept in `kept` when it has the wrong type.

    A state message is what the host shows of a device: one odd field must not hide the rest of it.
    """
    try:
        return read()
    except ProtocolError:
        kept[key] = obj.get(key)
        return None


def _slots(value: Any) -> Dict[str, Optional[ModelRef]]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(Code.BAD_FIELD, "field 'slots' must map slot names to {name, version} or null")
    return {str(k): None if v is None else ModelRef.from_obj(v) for k, v in value.items()}


@wire_class
@dataclass(frozen=True)
class State(DeviceMessage):
    """Retained birth message: online, agent and profile, runtimes, active model and slots, settings.

    The Last Will (`will_payload`) is a state with only `online: false`; it parses with seq -1.
    """

    TYPE: ClassVar[str] = "state"
    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {
            "online",
            "agent_version",
            "profile",
            "emulated",
            "threads",
            "runtimes",
            "delta",
            "active",
            "slots",
            "root_version",
            "tags",
            "http_port",
            "mqtt_infer",
            "started",
            "keepalive_s",
            "telemetry_interval_s",
        }
    )
    online: bool = True
    agent_version: Optional[str] = None
    profile: Optional[str] = None
    # The profile the agent emulates (its CPU budget cut to that device's), or None on real hardware.
    emulated: Optional[str] = None
    threads: Optional[int] = None
    runtimes: Tuple[str, ...] = ()
    # Patch formats this agent applies (wire key `delta`): the host may send a patch instead of a file.
    delta_formats: Tuple[str, ...] = ()
    active: Optional[ModelRef] = None
    slots: Dict[str, Optional[ModelRef]] = field(default_factory=dict)
    # Which fleet root (key set) this device trusts, so the host can see a rotation land.
    root_version: Optional[int] = None
    tags: Tuple[str, ...] = ()
    http_port: Optional[int] = None
    mqtt_infer: Optional[bool] = None
    started: Optional[float] = None
    # The host presumes a device gone after max(keepalive, 2 x telemetry interval) of silence.
    keepalive_s: Optional[float] = None
    telemetry_interval_s: Optional[float] = None

    def _fields(self) -> Dict[str, Any]:
        obj = {
            "online": self.online,
            "agent_version": self.agent_version,
            "profile": self.profile,
            "emulated": self.emulated,
            "threads": self.threads,
            "runtimes": list(self.runtimes),
            "delta": list(self.delta_formats),
            "active": None if self.active is None else self.active.to_obj(),
            "slots": {k: None if v is None else v.to_obj() for k, v in self.slots.items()},
            "root_version": self.root_version,
            "tags": list(self.tags),
            "http_port": self.http_port,
            "mqtt_infer": self.mqtt_infer,
            "started": self.started,
        }
        # Only an online birth advertises these (the offline state never did): None is left out.
        for key, value in (
            ("keepalive_s", self.keepalive_s),
            ("telemetry_interval_s", self.telemetry_interval_s),
        ):
            if value is not None:
                obj[key] = value
        return obj

    @property
    def info(self) -> Dict[str, Any]:
        """Everything but the envelope as one flat JSON object (for storing and showing, not indexing)."""
        return {k: v for k, v in self.to_obj().items() if k not in DEVICE_ENVELOPE and k != "online"}

    @classmethod
    def from_info(cls, device: str, seq: int, ts: float, online: bool, info: Mapping[str, Any]) -> State:
        """A State from the flat birth dict the agent assembles (the same keys as on the wire)."""
        obj = {**info, "online": online}
        return cls._parse(obj, {"device": device, "seq": seq, "ts": ts, "extra": split_extra(obj, cls.KEYS)})

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> State:
        online = get_bool(obj, "online")
        kept: Dict[str, Any] = dict(base.pop("extra", {}))

        def lenient(key: str, read: Callable[[], T]) -> Optional[T]:
            return _lenient(obj, key, read, kept)

        def text(key: str) -> Callable[[], Optional[str]]:
            return lambda: get_str(obj, key, optional=True, max_len=256)

        def num(key: str) -> Callable[[], Optional[float]]:
            return lambda: get_num(obj, key, optional=True)

        return cls(
            **base,
            extra=kept,
            online=bool(online),
            agent_version=lenient("agent_version", text("agent_version")),
            profile=lenient("profile", text("profile")),
            emulated=lenient("emulated", text("emulated")),
            threads=lenient("threads", lambda: opt_int(obj, "threads")),
            runtimes=lenient("runtimes", lambda: get_strs(obj, "runtimes")) or (),
            delta_formats=lenient("delta", lambda: get_strs(obj, "delta")) or (),
            active=lenient("active", lambda: part_or_none(obj, "active", ModelRef.from_obj)),
            slots=lenient("slots", lambda: _slots(obj.get("slots"))) or {},
            root_version=lenient("root_version", lambda: opt_int(obj, "root_version")),
            tags=lenient("tags", lambda: get_strs(obj, "tags")) or (),
            http_port=lenient("http_port", lambda: opt_int(obj, "http_port", maximum=65535)),
            mqtt_infer=lenient("mqtt_infer", lambda: get_bool(obj, "mqtt_infer", optional=True)),
            started=lenient("started", num("started")),
            keepalive_s=lenient("keepalive_s", num("keepalive_s")),
            telemetry_interval_s=lenient("telemetry_interval_s", num("telemetry_interval_s")),
        )


@wire_class
@dataclass(frozen=True)
class Telemetry(DeviceMessage):
    """Periodic report: serving model, requests, latency, quality readings and system metrics.

    Schema v2 (typed parts). A v1 message (one flat `metrics` object) still parses into the same fields.
    """

    TYPE: ClassVar[str] = "telemetry"
    VERSION: ClassVar[int] = 2
    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"model", "profile", "emulated", "uptime_s", "window_s", "requests", "latency", "quality", "system"}
    )
    model: Optional[ModelRef] = None
    profile: Optional[str] = None
    emulated: Optional[str] = None
    uptime_s: Optional[float] = None
    window_s: Optional[float] = None
    requests: Requests = field(default_factory=Requests)
    latency: Latency = field(default_factory=Latency)
    quality: Tuple[Quality, ...] = ()
    system: SystemMetrics = field(default_factory=SystemMetrics)

    def quality_of(self, metric: str, source: Optional[str] = None) -> Optional[Quality]:
        """The first reading of `metric` (from `source` when given), or None."""
        for reading in self.quality:
            if reading.metric == metric and (source is None or reading.source == source):
                return reading
        return None

    def _fields(self) -> Dict[str, Any]:
        return {
            "model": None if self.model is None else self.model.to_obj(),
            "profile": self.profile,
            "emulated": self.emulated,
            "uptime_s": self.uptime_s,
            "window_s": self.window_s,
            "requests": self.requests.to_obj(),
            "latency": self.latency.to_obj(),
            "quality": [q.to_dict() for q in self.quality],
            "system": self.system.to_obj(),
        }

    def flat_metrics(self) -> Dict[str, Any]:
        """The report as one flat object with the v1 `metrics` key names (store rows, displays, old tools).

        The inverse of `from_metrics`: quality readings appear as `quality` (a list) and the eval-sourced
        one also under its metric's name; feedback accuracy as `live_accuracy`.
        """
        lat, req, sys_ = self.latency, self.requests, self.system
        flat: Dict[str, Any] = dict(self.extra)
        flat.update(
            model=None if self.model is None else self.model.name,
            model_version=None if self.model is None else self.model.version,
            profile=self.profile,
            emulated=self.emulated,
            uptime_s=self.uptime_s,
            window_s=self.window_s,
            count=req.count,
            errors=req.errors,
            errors_by_code=dict(req.errors_by_code),
            rate_per_s=req.rate_per_s,
            feedback=req.feedback,
            total_count=req.total_count,
            total_errors=req.total_errors,
            latency_ms={k: v for k, v in lat.to_obj().items() if k != "count"},
            p50_ms=lat.p50_ms,
            p95_ms=lat.p95_ms,
            p99_ms=lat.p99_ms,
            mean_ms=lat.mean_ms,
            process_cpu_percent=sys_.process_cpu_percent,
            system_cpu_percent=sys_.system_cpu_percent,
            rss_bytes=sys_.rss_bytes,
            disk_free_bytes=sys_.disk_free_bytes,
            disk_total_bytes=sys_.disk_total_bytes,
            soc_temp_c=sys_.temp_c,
            load_avg_1m=sys_.load_avg_1m,
            system_uptime_s=sys_.system_uptime_s,
            cpu_count=sys_.cpu_count,
            quality=[q.to_dict() for q in self.quality],
        )
        live = self.quality_of("accuracy", "feedback")
        flat["live_accuracy"] = None if live is None else live.value
        return flat

    @classmethod
    def from_metrics(cls, device: str, seq: int, ts: float, metrics: Mapping[str, Any]) -> Telemetry:
        """A Telemetry from a schema-v1 flat `metrics` object (old agents, old tests and benches)."""
        return cls(device=device, seq=seq, ts=ts, **legacy_parts(metrics))

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Telemetry:
        if obj["v"] == 1:
            parts = legacy_parts(get_dict(obj, "metrics"))
            kept = {k: v for k, v in base.pop("extra").items() if k != "metrics"}
            parts["extra"] = {**kept, **parts["extra"]}
            return cls(**base, **parts)
        quality = get_list(obj, "quality", max_len=16) if obj.get("quality") is not None else []
        return cls(
            **base,
            model=part_or_none(obj, "model", ModelRef.from_obj),
            profile=get_str(obj, "profile", optional=True, max_len=256),
            emulated=get_str(obj, "emulated", optional=True, max_len=256),
            uptime_s=get_num(obj, "uptime_s", optional=True),
            window_s=get_num(obj, "window_s", optional=True),
            requests=Requests.from_obj(get_dict(obj, "requests")),
            latency=Latency.from_obj(get_dict(obj, "latency")),
            quality=tuple(quality_from_obj(q) for q in quality),
            system=SystemMetrics.from_obj(get_dict(obj, "system")),
        )


DEVICE_MESSAGES: Dict[str, Type[DeviceMessage]] = {
    c.TYPE: c for c in (Error, Progress, Missing, Deployed, Rejected, Result, State, Telemetry)
}


def build_message(cls: Type[M], device: str, seq: int, ts: float, **fields: Any) -> M:
    """A device message from its fields; a State may come as `online` + flat `info` dict and a Telemetry
    as a v1 flat `metrics` dict (the shapes agents, benches and tests assembled before the typed parts)."""
    if issubclass(cls, State) and "info" in fields:
        info = fields.pop("info") or {}
        return cls.from_info(device, seq, ts, bool(fields.pop("online", True)), {**info, **fields})  # type: ignore[return-value]
    if issubclass(cls, Telemetry) and "metrics" in fields:
        return cls.from_metrics(device, seq, ts, fields["metrics"])  # type: ignore[return-value]
    return cls(device=device, seq=seq, ts=ts, **fields)


def will_payload(device_id: str) -> bytes:
    """The Last Will: a retained state saying the device is offline (no seq: it is fixed at connect)."""
    return encode_json({"v": State.VERSION, "type": State.TYPE, "device": device_id, "online": False})


def parse_device_message(payload: bytes, *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> DeviceMessage:
    """Decode a device → host message (the host side's `from_wire`); Last Will payloads get seq -1."""
    obj = decode_json(payload, max_bytes=max_bytes)
    check_version(obj, "device message", max(c.VERSION for c in DEVICE_MESSAGES.values()))
    kind = get_str(obj, "type", max_len=64)
    cls = DEVICE_MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown device message type {kind!r}")
    check_version(obj, kind, cls.VERSION)
    is_will = kind == State.TYPE and obj.get("online") is False and "seq" not in obj
    base = {
        "device": get_str(obj, "device", max_len=128),
        "seq": -1 if is_will else get_int(obj, "seq"),
        "ts": 0.0 if is_will else get_num(obj, "ts"),
        "extra": split_extra(obj, cls.KEYS | DEVICE_ENVELOPE),
    }
    return cls._parse(obj, base)


__all__ = [
    "DEVICE_ENVELOPE",
    "DEVICE_MESSAGES",
    "Deployed",
    "DeviceMessage",
    "Error",
    "Missing",
    "Progress",
    "Rejected",
    "Result",
    "State",
    "Telemetry",
    "build_message",
    "parse_device_message",
    "will_payload",
]
