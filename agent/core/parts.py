"""The typed parts of device reports: a model reference, and telemetry's requests, latency and system parts.

Each part is a frozen dataclass with `to_obj()` / `from_obj()`; keys a newer agent added stay in `extra`.
`legacy_parts()` reads the flat `metrics` object of schema-v1 telemetry into these parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, FrozenSet, Mapping, Optional, Tuple

from edgefleet.agent.core.codes import Code, QualitySource
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.quality import Quality, QualityError, reading_from
from edgefleet.agent.core.wire import WirePart, get_dict, get_int, get_num, get_str, opt_int, wire_class


def _opt_str(obj: Mapping[str, Any], key: str) -> Optional[str]:
    value = get_str(obj, key, optional=True, max_len=256)
    return None if value is None else str(value)


@wire_class
@dataclass(frozen=True)
class ModelRef(WirePart):
    """A model by name and version (the serving one, a slot's); None fields for an unreadable slot."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset({"name", "version"})
    name: Optional[str] = None
    version: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"name": self.name, "version": self.version}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> ModelRef:
        return cls(name=_opt_str(obj, "name"), version=opt_int(obj, "version"), extra=extra)


@wire_class
@dataclass(frozen=True)
class Latency(WirePart):
    """Serving latency over one telemetry window, in ms (None when the window had no request)."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset({"count", "mean_ms", "p50_ms", "p95_ms", "p99_ms", "max_ms"})
    count: int = 0
    mean_ms: Optional[float] = None
    p50_ms: Optional[float] = None
    p95_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    max_ms: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {
            "count": self.count,
            "mean_ms": self.mean_ms,
            "p50_ms": self.p50_ms,
            "p95_ms": self.p95_ms,
            "p99_ms": self.p99_ms,
            "max_ms": self.max_ms,
        }

    @classmethod
    def of(cls, count: int, ms: Callable[[str], Optional[float]], **kw: Any) -> Latency:
        """A Latency whose figures `ms(key)` gives (keys mean_ms, p50_ms, p95_ms, p99_ms, max_ms)."""
        return cls(
            count=count,
            mean_ms=ms("mean_ms"),
            p50_ms=ms("p50_ms"),
            p95_ms=ms("p95_ms"),
            p99_ms=ms("p99_ms"),
            max_ms=ms("max_ms"),
            **kw,
        )

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> Latency:
        return cls.of(get_int(obj, "count"), lambda k: get_num(obj, k, optional=True), extra=extra)


@wire_class
@dataclass(frozen=True)
class Requests(WirePart):
    """Requests and errors of one telemetry window, feedback labels received, and totals since start."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"count", "errors", "errors_by_code", "rate_per_s", "feedback", "total_count", "total_errors"}
    )
    count: int = 0
    errors: int = 0
    errors_by_code: Dict[str, int] = field(default_factory=dict)
    rate_per_s: Optional[float] = None
    feedback: int = 0
    total_count: int = 0
    total_errors: int = 0
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {
            "count": self.count,
            "errors": self.errors,
            "errors_by_code": dict(self.errors_by_code),
            "rate_per_s": self.rate_per_s,
            "feedback": self.feedback,
            "total_count": self.total_count,
            "total_errors": self.total_errors,
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> Requests:
        by_code = get_dict(obj, "errors_by_code", optional=True)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in by_code.values()):
            raise ProtocolError(Code.BAD_FIELD, "field 'errors_by_code' must map codes to counts")
        return cls(
            count=get_int(obj, "count"),
            errors=get_int(obj, "errors"),
            errors_by_code=dict(by_code),
            rate_per_s=get_num(obj, "rate_per_s", optional=True),
            feedback=opt_int(obj, "feedback") or 0,
            total_count=opt_int(obj, "total_count") or 0,
            total_errors=opt_int(obj, "total_errors") or 0,
            extra=extra,
        )


@wire_class
@dataclass(frozen=True)
class SystemMetrics(WirePart):
    """The device and the agent process: CPU (100 = one core for the process, all cores for the system),
    resident memory, disk under the state folder, SoC temperature, load and uptime (None where unknown)."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {
            "process_cpu_percent",
            "system_cpu_percent",
            "rss_bytes",
            "disk_free_bytes",
            "disk_total_bytes",
            "temp_c",
            "load_avg_1m",
            "system_uptime_s",
            "cpu_count",
        }
    )
    process_cpu_percent: Optional[float] = None
    system_cpu_percent: Optional[float] = None
    rss_bytes: Optional[int] = None
    disk_free_bytes: Optional[int] = None
    disk_total_bytes: Optional[int] = None
    temp_c: Optional[float] = None
    load_avg_1m: Optional[float] = None
    system_uptime_s: Optional[float] = None
    cpu_count: Optional[int] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def rss_mb(self) -> Optional[float]:
        """Resident memory in MiB (None when unknown)."""
        return None if self.rss_bytes is None else self.rss_bytes / (1 << 20)

    def _fields(self) -> Dict[str, Any]:
        return {
            "process_cpu_percent": self.process_cpu_percent,
            "system_cpu_percent": self.system_cpu_percent,
            "rss_bytes": self.rss_bytes,
            "disk_free_bytes": self.disk_free_bytes,
            "disk_total_bytes": self.disk_total_bytes,
            "temp_c": self.temp_c,
            "load_avg_1m": self.load_avg_1m,
            "system_uptime_s": self.system_uptime_s,
            "cpu_count": self.cpu_count,
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> SystemMetrics:
        floats = ("process_cpu_percent", "system_cpu_percent", "temp_c", "load_avg_1m", "system_uptime_s")
        ints = ("rss_bytes", "disk_free_bytes", "disk_total_bytes", "cpu_count")
        values: Dict[str, Any] = {k: get_num(obj, k, optional=True) for k in floats}
        values.update({k: opt_int(obj, k) for k in ints})
        return cls(extra=extra, **values)


def quality_from_obj(obj: Any) -> Quality:
    """One `quality` entry of a telemetry message; a malformed one is a protocol error (bad-field)."""
    if not isinstance(obj, dict):
        raise ProtocolError(
            Code.BAD_FIELD, "every entry of 'quality' must be an object {metric, value, samples, source}"
        )
    try:
        return Quality.from_dict(obj)
    except QualityError as exc:
        raise ProtocolError(Code.BAD_FIELD, f"field 'quality': {exc.reason}") from None


# ---------------------------------------------------------------------------------------------------
# Schema-v1 telemetry: one flat `metrics` object. Read leniently: a device of that age is no reason to
# lose a whole report, so a value of the wrong type reads as unknown.


def _num(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _int(value: Any) -> Optional[int]:
    number = _num(value)
    return None if number is None else int(number)


# The v1 keys the parts below take over; every other key of `metrics` is kept in the message's `extra`.
LEGACY_KEYS = frozenset(
    {
        "model",
        "model_version",
        "profile",
        "emulated",
        "uptime_s",
        "window_s",
        "count",
        "errors",
        "errors_by_code",
        "rate_per_s",
        "feedback",
        "total_count",
        "total_errors",
        "latency_ms",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "mean_ms",
        "live_accuracy",
        "process_cpu_percent",
        "system_cpu_percent",
        "rss_bytes",
        "disk_free_bytes",
        "disk_total_bytes",
        "soc_temp_c",
        "load_avg_1m",
        "system_uptime_s",
        "cpu_count",
        "quality",
    }
)


def legacy_quality(metrics: Mapping[str, Any]) -> Tuple[Quality, ...]:
    """Quality readings of a v1 `metrics` object: its eval (or `quality`) and its live feedback accuracy."""
    out = []
    try:
        reading = reading_from(metrics.get("quality")) or reading_from(metrics.get("eval"))
    except QualityError:
        reading = None
    if reading is not None:
        out.append(reading)
    live, feedback = _num(metrics.get("live_accuracy")), _int(metrics.get("feedback")) or 0
    if live is not None:
        out.append(Quality("accuracy", live, samples=feedback, source=QualitySource.FEEDBACK.value))
    return tuple(out)


def legacy_parts(metrics: Mapping[str, Any]) -> Dict[str, Any]:
    """The typed Telemetry fields of a v1 flat `metrics` object (keys no part takes end up in `extra`)."""
    m = metrics
    latency = m.get("latency_ms") if isinstance(m.get("latency_ms"), Mapping) else {}
    assert isinstance(latency, Mapping)
    by_code = m.get("errors_by_code") if isinstance(m.get("errors_by_code"), Mapping) else {}
    assert isinstance(by_code, Mapping)
    model = m.get("model")
    emulated = m.get("emulated")
    return {
        "model": ModelRef(model, _int(m.get("model_version"))) if isinstance(model, str) else None,
        "profile": m.get("profile") if isinstance(m.get("profile"), str) else None,
        "emulated": emulated if isinstance(emulated, str) else None,
        "uptime_s": _num(m.get("uptime_s")),
        "window_s": _num(m.get("window_s")),
        "requests": Requests(
            count=_int(m.get("count")) or 0,
            errors=_int(m.get("errors")) or 0,
            errors_by_code={str(k): int(v) for k, v in by_code.items() if _int(v) is not None},
            rate_per_s=_num(m.get("rate_per_s")),
            feedback=_int(m.get("feedback")) or 0,
            total_count=_int(m.get("total_count")) or 0,
            total_errors=_int(m.get("total_errors")) or 0,
        ),
        "latency": Latency.of(_int(m.get("count")) or 0, lambda k: _num(latency.get(k, m.get(k)))),
        "quality": legacy_quality(m),
        "system": SystemMetrics(
            process_cpu_percent=_num(m.get("process_cpu_percent")),
            system_cpu_percent=_num(m.get("system_cpu_percent")),
            rss_bytes=_int(m.get("rss_bytes")),
            disk_free_bytes=_int(m.get("disk_free_bytes")),
            disk_total_bytes=_int(m.get("disk_total_bytes")),
            temp_c=_num(m.get("soc_temp_c")),
            load_avg_1m=_num(m.get("load_avg_1m")),
            system_uptime_s=_num(m.get("system_uptime_s")),
            cpu_count=_int(m.get("cpu_count")),
        ),
        "extra": {k: v for k, v in m.items() if k not in LEGACY_KEYS},
    }


__all__ = [
    "LEGACY_KEYS",
    "Latency",
    "ModelRef",
    "Requests",
    "SystemMetrics",
    "legacy_parts",
    "legacy_quality",
    "quality_from_obj",
]
