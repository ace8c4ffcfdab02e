"""The wire protocol between host and agent: topics, message types and their JSON encoding.

Defined here, on the device side, so the device never depends on host code; the SDK imports it.
Control messages are JSON objects carrying `v` (schema version) and `type`; every message the device
sends also carries `device`, `ts` and a per-device `seq` so the host can detect gaps (after an agent
restart the sequence jumps forward; the retained `state` birth message marks that). Artifact chunks are
raw bytes on `artifact/{sha256}/{index}` (broadcast) and `dev/{id}/chunk/{sha256}/{index}` (repairs).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from edgefleet.agent.core.errors import ProtocolError

SCHEMA_VERSION = 1
TOPIC_ROOT = "edgefleet/v1"
# A control message larger than this is refused unread; deploy commands are a few KiB.
DEFAULT_MAX_CONTROL_BYTES = 1 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class Code:
    """Stable machine-readable error codes carried by `Error` events."""

    BAD_JSON = "bad-json"
    BAD_MESSAGE = "bad-message"
    MISSING_FIELD = "missing-field"
    BAD_FIELD = "bad-field"
    UNKNOWN_TYPE = "unknown-type"
    UNSUPPORTED_VERSION = "unsupported-version"
    WRONG_DEVICE = "wrong-device"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    BAD_TOPIC = "bad-topic"
    UNKNOWN_TRANSFER = "unknown-transfer"
    CHUNK_INDEX = "chunk-index-out-of-range"
    CHUNK_OVERSIZE = "chunk-oversize"
    CHUNK_SIZE = "chunk-size-mismatch"
    CHUNK_HASH = "chunk-hash-mismatch"
    HASH_MISMATCH = "hash-mismatch"
    TRANSFER_TIMEOUT = "transfer-timeout"
    BUSY = "busy"
    NO_MODEL = "no-model"
    INFER_DISABLED = "infer-disabled"
    INTERNAL = "internal-error"


def valid_name(value: str) -> bool:
    """Whether `value` may appear as one MQTT topic level (device id, fleet name)."""
    return bool(_NAME_RE.match(value))


def valid_sha256(value: str) -> bool:
    """Whether `value` is a lowercase hex sha256 digest."""
    return bool(_SHA_RE.match(value))


@dataclass(frozen=True)
class Topics:
    """Every topic one device uses, under `edgefleet/v1/{fleet}`."""

    fleet: str
    device_id: str

    def __post_init__(self) -> None:
        for label, value in (("fleet", self.fleet), ("device id", self.device_id)):
            if not valid_name(value):
                raise ProtocolError(
                    Code.BAD_FIELD,
                    f"{label} {value!r} is not usable in a topic: use 1-128 letters, digits, '.', '_' or '-'",
                )

    @property
    def prefix(self) -> str:
        """The fleet's topic prefix."""
        return f"{TOPIC_ROOT}/{self.fleet}"

    @property
    def device(self) -> str:
        """The device's own topic prefix."""
        return f"{self.prefix}/dev/{self.device_id}"

    @property
    def state(self) -> str:
        """Retained birth / Last Will topic."""
        return f"{self.device}/state"

    @property
    def cmd(self) -> str:
        """Commands from the host."""
        return f"{self.device}/cmd"

    @property
    def evt(self) -> str:
        """Progress, outcomes, missing chunk ranges and errors."""
        return f"{self.device}/evt"

    @property
    def telemetry(self) -> str:
        """Periodic metrics."""
        return f"{self.device}/telemetry"

    @property
    def repair_filter(self) -> str:
        """Subscription for chunks re-sent to this device alone."""
        return f"{self.device}/chunk/#"

    def artifact(self, sha256: str, index: int) -> str:
        """Broadcast topic of one chunk."""
        return f"{self.prefix}/artifact/{sha256}/{index}"

    def artifact_filter(self, sha256: str) -> str:
        """Subscription for every broadcast chunk of one file."""
        return f"{self.prefix}/artifact/{sha256}/+"

    def repair(self, sha256: str, index: int) -> str:
        """Repair topic of one chunk for this device."""
        return f"{self.device}/chunk/{sha256}/{index}"

    def parse_chunk_topic(self, topic: str) -> Optional[Tuple[str, int]]:
        """Return (sha256, index) when `topic` is a chunk topic of this device or fleet, else None.

        Raises ProtocolError for a chunk topic whose hash or index is malformed.
        """
        for base in (f"{self.prefix}/artifact/", f"{self.device}/chunk/"):
            if topic.startswith(base):
                rest = topic[len(base) :].split("/")
                if len(rest) != 2:
                    raise ProtocolError(
                        Code.BAD_TOPIC, f"chunk topic {topic!r} must end in /<sha256>/<index>"
                    )
                sha, idx = rest
                if not valid_sha256(sha):
                    raise ProtocolError(Code.BAD_TOPIC, f"chunk topic {topic!r} has no valid sha256")
                if not idx.isdigit() or len(idx) > 9:
                    raise ProtocolError(Code.BAD_TOPIC, f"chunk topic {topic!r} has no valid chunk index")
                return sha, int(idx)
        return None


# ---------------------------------------------------------------------------------------------------
# Field readers: each names the field and what was expected, so Error events are actionable.


def _require(obj: Mapping[str, Any], key: str) -> Any:
    if key not in obj:
        raise ProtocolError(Code.MISSING_FIELD, f"field {key!r} is missing")
    return obj[key]


def _str(obj: Mapping[str, Any], key: str, *, optional: bool = False, max_len: int = 4096) -> Any:
    if optional and obj.get(key) is None:
        return None
    value = _require(obj, key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a string of at most {max_len} characters")
    return value


def _int(obj: Mapping[str, Any], key: str, *, minimum: int = 0, maximum: int = 1 << 62) -> int:
    value = _require(obj, key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be an integer in [{minimum}, {maximum}]")
    return value


def _num(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[float]:
    if optional and obj.get(key) is None:
        return None
    value = _require(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a number")
    return float(value)


def _dict(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Dict[str, Any]:
    if optional and obj.get(key) is None:
        return {}
    value = _require(obj, key)
    if not isinstance(value, dict):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a JSON object")
    return value


def _list(obj: Mapping[str, Any], key: str, *, max_len: int = 1 << 20) -> List[Any]:
    value = _require(obj, key)
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a list of at most {max_len} items")
    return value


def _sha(obj: Mapping[str, Any], key: str) -> str:
    value = _str(obj, key)
    if not valid_sha256(value):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a lowercase hex sha256 digest")
    return str(value)


def _b64(obj: Mapping[str, Any], key: str) -> bytes:
    value = _str(obj, key, max_len=DEFAULT_MAX_CONTROL_BYTES * 2)
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be standard base64") from None


def decode_json(payload: bytes, *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> Dict[str, Any]:
    """Parse a control payload into a JSON object, refusing oversized, non-UTF-8 or non-object input."""
    if len(payload) > max_bytes:
        raise ProtocolError(
            Code.PAYLOAD_TOO_LARGE, f"message of {len(payload)} bytes exceeds the limit of {max_bytes} bytes"
        )
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(Code.BAD_JSON, f"message is not valid UTF-8 JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(Code.BAD_MESSAGE, "message must be a JSON object with 'v' and 'type'")
    return obj


def _check_version(obj: Mapping[str, Any]) -> None:
    version = _require(obj, "v")
    if version != SCHEMA_VERSION:
        raise ProtocolError(
            Code.UNSUPPORTED_VERSION,
            f"schema version {version!r} is not supported; this agent speaks v{SCHEMA_VERSION}",
        )


def _encode(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------------------------------------------
# Commands: host → device on dev/{id}/cmd.

C = TypeVar("C", bound="Command")


@dataclass(frozen=True)
class Command:
    """Base of host → device commands; `id` correlates the events that answer it."""

    TYPE: ClassVar[str] = ""
    id: str

    def _fields(self) -> Dict[str, Any]:
        return {}

    def to_wire(self) -> bytes:
        """Encode as a JSON payload."""
        return _encode({"v": SCHEMA_VERSION, "type": self.TYPE, "id": self.id, **self._fields()})

    @classmethod
    def _parse(cls: Type[C], obj: Mapping[str, Any], cmd_id: str) -> C:
        return cls(id=cmd_id)


@dataclass(frozen=True)
class FileTransfer:
    """How one bundle file travels: its signed hash and size, and how it is cut into chunks."""

    file: str
    sha256: str
    size: int
    chunk_size: int
    chunks: int
    # Optional per-chunk digests: an unsigned hint that lets the agent refuse a tampered chunk at once
    # and ask for it again; the signed whole-file sha256 stays the authority.
    chunk_sha256: Tuple[str, ...] = ()
    # Optional digests of every prefix: entry k is the sha256 of chunks 0..k, so the last one is the
    # file's signed sha256. A chunk that extends the in-order prefix is checked by finishing a copy of the
    # running hash (no second pass over its bytes); chunks out of order still use `chunk_sha256`.
    prefix_sha256: Tuple[str, ...] = ()
    # Optional bsdiff4 patch against a file the device already has (see agent/delta.py); an agent
    # that cannot use it downloads the full file. Unsigned: the rebuilt file must match `sha256`.
    delta: Optional[Dict[str, Any]] = field(default=None, compare=False)

    def to_obj(self) -> Dict[str, Any]:
        """Plain JSON object."""
        obj: Dict[str, Any] = {
            "file": self.file,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
        }
        if self.chunk_sha256:
            obj["chunk_sha256"] = list(self.chunk_sha256)
        if self.prefix_sha256:
            obj["prefix_sha256"] = list(self.prefix_sha256)
        if self.delta is not None:
            obj["delta"] = self.delta
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> FileTransfer:
        """Parse and check that size, chunk size and chunk count agree."""
        if not isinstance(obj, dict):
            raise ProtocolError(Code.BAD_FIELD, "every entry of 'files' must be a JSON object")
        name = _str(obj, "file", max_len=255)
        parts = name.split("/")
        if "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ProtocolError(Code.BAD_FIELD, f"file name {name!r} must be a relative path without '..'")
        size = _int(obj, "size")
        chunk_size = _int(obj, "chunk_size", minimum=1, maximum=1 << 30)
        chunks = _int(obj, "chunks", maximum=1 << 31)
        expected = -(-size // chunk_size)
        if chunks != expected:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"file {name!r}: {size} bytes in chunks of {chunk_size} make {expected} chunks, not {chunks}",
            )
        digests = _digest_list(obj, "chunk_sha256", name, chunks)
        sha256 = _sha(obj, "sha256")
        prefixes = _digest_list(obj, "prefix_sha256", name, chunks)
        if prefixes and prefixes[-1] != sha256:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"file {name!r}: the last 'prefix_sha256' must be the file's sha256; the host built it wrong",
            )
        delta = obj.get("delta") if isinstance(obj.get("delta"), dict) else None
        return cls(name, sha256, size, chunk_size, chunks, digests, prefixes, delta)


def _digest_list(obj: Dict[str, Any], key: str, name: str, chunks: int) -> Tuple[str, ...]:
    """An optional list of one sha256 per chunk under `key`, or ()."""
    if obj.get(key) is None:
        return ()
    raw = _list(obj, key)
    if len(raw) != chunks or not all(isinstance(d, str) and valid_sha256(d) for d in raw):
        raise ProtocolError(Code.BAD_FIELD, f"file {name!r}: {key!r} must list one sha256 per chunk")
    return tuple(raw)


@dataclass(frozen=True)
class DeployCommand(Command):
    """Install a signed bundle: canonical manifest bytes, their signatures, and how each file travels."""

    TYPE: ClassVar[str] = "deploy"
    manifest: bytes = b""
    signatures: Dict[str, Any] = field(default_factory=dict)
    files: Tuple[FileTransfer, ...] = ()
    device: Optional[str] = None

    def _fields(self) -> Dict[str, Any]:
        obj: Dict[str, Any] = {
            "manifest": base64.b64encode(self.manifest).decode("ascii"),
            "signatures": self.signatures,
            "files": [f.to_obj() for f in self.files],
        }
        if self.device is not None:
            obj["device"] = self.device
        return obj

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], cmd_id: str) -> DeployCommand:
        files = tuple(FileTransfer.from_obj(f) for f in _list(obj, "files", max_len=64))
        if not files:
            raise ProtocolError(Code.BAD_FIELD, "field 'files' must name at least one file")
        if len({f.file for f in files}) != len(files):
            raise ProtocolError(Code.BAD_FIELD, "field 'files' names a file twice")
        return cls(
            id=cmd_id,
            manifest=_b64(obj, "manifest"),
            signatures=_dict(obj, "signatures"),
            files=files,
            device=_str(obj, "device", optional=True, max_len=128),
        )


@dataclass(frozen=True)
class RollbackCommand(Command):
    """Return to the previous slot's model."""

    TYPE: ClassVar[str] = "rollback"


@dataclass(frozen=True)
class EvalCommand(Command):
    """Measure the active model on its bundle's eval set now and report it on `evt`."""

    TYPE: ClassVar[str] = "eval"


@dataclass(frozen=True)
class StatusCommand(Command):
    """Re-publish the retained `state` message and answer with the install status on `evt`."""

    TYPE: ClassVar[str] = "status"


@dataclass(frozen=True)
class ConfigCommand(Command):
    """Change run-time settings (for now the telemetry interval)."""

    TYPE: ClassVar[str] = "config"
    telemetry_interval_s: Optional[float] = None

    def _fields(self) -> Dict[str, Any]:
        return (
            {} if self.telemetry_interval_s is None else {"telemetry_interval_s": self.telemetry_interval_s}
        )

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], cmd_id: str) -> ConfigCommand:
        interval = _num(obj, "telemetry_interval_s", optional=True)
        if interval is not None and not 0.1 <= interval <= 86400:
            raise ProtocolError(
                Code.BAD_FIELD, "field 'telemetry_interval_s' must be in [0.1, 86400] seconds"
            )
        return cls(id=cmd_id, telemetry_interval_s=interval)


@dataclass(frozen=True)
class InferCommand(Command):
    """Run one inference remotely; inputs are `{name: {dtype, shape, data (base64)}}`."""

    TYPE: ClassVar[str] = "infer"
    inputs: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"inputs": self.inputs}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], cmd_id: str) -> InferCommand:
        inputs = _dict(obj, "inputs")
        for name, spec in inputs.items():
            if not isinstance(spec, dict):
                raise ProtocolError(
                    Code.BAD_FIELD, f"input {name!r} must be an object with dtype, shape, data"
                )
            _str(spec, "dtype", max_len=16)
            shape = _list(spec, "shape", max_len=16)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ProtocolError(
                    Code.BAD_FIELD, f"input {name!r}: 'shape' must list non-negative integers"
                )
            _b64(spec, "data")
        return cls(id=cmd_id, inputs=dict(inputs))


# A rotation carries at most this many signatures (the agent's trust store refuses more, too).
MAX_ROTATION_SIGNATURES = 64


@dataclass(frozen=True)
class RotateRootCommand(Command):
    """Trust a new fleet root (key rotation): its canonical bytes and the signatures over them.

    The device applies it only when it is exactly one root version newer and signed by the threshold
    of both the current and the new root (agent/trust.py `TrustStore.apply_root`); `root` travels as the
    exact signed bytes, like a deploy's manifest, so no re-encoding can change what was signed.
    """

    TYPE: ClassVar[str] = "rotate-root"
    root: bytes = b""
    signatures: Tuple[Dict[str, str], ...] = ()

    def _fields(self) -> Dict[str, Any]:
        return {
            "root": base64.b64encode(self.root).decode("ascii"),
            "signatures": [{"keyid": s["keyid"], "sig": s["sig"]} for s in self.signatures],
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], cmd_id: str) -> RotateRootCommand:
        entries = _list(obj, "signatures", max_len=MAX_ROTATION_SIGNATURES)
        signatures: List[Dict[str, str]] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ProtocolError(Code.BAD_FIELD, "field 'signatures' must list {keyid, sig} objects")
            signatures.append(
                {"keyid": _str(entry, "keyid", max_len=128), "sig": _str(entry, "sig", max_len=256)}
            )
        root = _b64(obj, "root")
        if not root:
            raise ProtocolError(Code.BAD_FIELD, "field 'root' must hold the canonical root document")
        return cls(id=cmd_id, root=root, signatures=tuple(signatures))


COMMANDS: Dict[str, Type[Command]] = {
    c.TYPE: c
    for c in (
        DeployCommand,
        RollbackCommand,
        EvalCommand,
        StatusCommand,
        ConfigCommand,
        InferCommand,
        RotateRootCommand,
    )
}

AnyCommand = Union[
    DeployCommand,
    RollbackCommand,
    EvalCommand,
    StatusCommand,
    ConfigCommand,
    InferCommand,
    RotateRootCommand,
]


def parse_command(payload: bytes, *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> Command:
    """Decode and validate a command payload; raises ProtocolError with a code and a reason."""
    obj = decode_json(payload, max_bytes=max_bytes)
    _check_version(obj)
    kind = _str(obj, "type", max_len=64)
    cls = COMMANDS.get(kind)
    if cls is None:
        raise ProtocolError(
            Code.UNKNOWN_TYPE, f"unknown command type {kind!r}; known: {', '.join(sorted(COMMANDS))}"
        )
    cmd_id = _str(obj, "id", max_len=128)
    return cls._parse(obj, cmd_id)


def command_id_of(payload: bytes) -> Optional[str]:
    """Best-effort id of a (possibly malformed) command, so an Error event can point back at it."""
    try:
        obj = json.loads(payload[:DEFAULT_MAX_CONTROL_BYTES].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


# ---------------------------------------------------------------------------------------------------
# Device → host messages: events on evt, state (retained) and telemetry.

M = TypeVar("M", bound="DeviceMessage")


@dataclass(frozen=True)
class DeviceMessage:
    """Base of messages a device sends: who, when, and the per-device sequence number."""

    TYPE: ClassVar[str] = ""
    device: str
    seq: int
    ts: float

    def _fields(self) -> Dict[str, Any]:
        return {}

    def to_obj(self) -> Dict[str, Any]:
        """Plain JSON object."""
        return {
            "v": SCHEMA_VERSION,
            "type": self.TYPE,
            "device": self.device,
            "seq": self.seq,
            "ts": self.ts,
            **self._fields(),
        }

    def to_wire(self) -> bytes:
        """Encode as a JSON payload."""
        return _encode(self.to_obj())

    @classmethod
    def _parse(cls: Type[M], obj: Mapping[str, Any], base: Dict[str, Any]) -> M:
        return cls(**base)


@dataclass(frozen=True)
class Error(DeviceMessage):
    """Something the device received or tried failed; `code` is stable, `reason` says what to do."""

    TYPE: ClassVar[str] = "error"
    code: str = Code.INTERNAL
    reason: str = ""
    ref: Optional[str] = None

    def _fields(self) -> Dict[str, Any]:
        return {"code": self.code, "reason": self.reason, "ref": self.ref}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Error:
        return cls(
            **base,
            code=_str(obj, "code", max_len=64),
            reason=_str(obj, "reason", max_len=1 << 16),
            ref=_str(obj, "ref", optional=True, max_len=1024),
        )


@dataclass(frozen=True)
class Progress(DeviceMessage):
    """A deployment reached a step (verify-manifest, download, verify, write, load, health, switch)."""

    TYPE: ClassVar[str] = "progress"
    deploy: str = ""
    step: str = ""
    detail: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "step": self.step, "detail": self.detail}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Progress:
        return cls(
            **base,
            deploy=_str(obj, "deploy", max_len=128),
            step=_str(obj, "step", max_len=64),
            detail=_dict(obj, "detail", optional=True),
        )


@dataclass(frozen=True)
class Missing(DeviceMessage):
    """Chunk ranges (inclusive `[start, end]`) of one file the device still needs: resend on repair."""

    TYPE: ClassVar[str] = "missing"
    deploy: str = ""
    sha256: str = ""
    ranges: Tuple[Tuple[int, int], ...] = ()

    def _fields(self) -> Dict[str, Any]:
        return {"deploy": self.deploy, "sha256": self.sha256, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Missing:
        ranges = []
        for item in _list(obj, "ranges"):
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
            **base, deploy=_str(obj, "deploy", max_len=128), sha256=_sha(obj, "sha256"), ranges=tuple(ranges)
        )


@dataclass(frozen=True)
class Deployed(DeviceMessage):
    """A deployment ended with the new model serving."""

    TYPE: ClassVar[str] = "deployed"
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
            deploy=_str(obj, "deploy", max_len=128),
            name=_str(obj, "name", max_len=256),
            version=_int(obj, "version"),
            health=_dict(obj, "health", optional=True),
        )


@dataclass(frozen=True)
class Rejected(DeviceMessage):
    """A deployment failed at `step`; the old model keeps serving."""

    TYPE: ClassVar[str] = "rejected"
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
            deploy=_str(obj, "deploy", max_len=128),
            step=_str(obj, "step", max_len=64),
            code=_str(obj, "code", max_len=64),
            reason=_str(obj, "reason", max_len=1 << 16),
        )


@dataclass(frozen=True)
class Result(DeviceMessage):
    """The answer to a command other than deploy (rollback, eval, status, config, infer, rotate-root)."""

    TYPE: ClassVar[str] = "result"
    ref: str = ""
    command: str = ""
    data: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"ref": self.ref, "command": self.command, "data": self.data}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Result:
        return cls(
            **base,
            ref=_str(obj, "ref", max_len=128),
            command=_str(obj, "command", max_len=64),
            data=_dict(obj, "data", optional=True),
        )


@dataclass(frozen=True)
class State(DeviceMessage):
    """Retained birth message (online, versions, profile, runtimes, active model, slots); the Will sets offline."""

    TYPE: ClassVar[str] = "state"
    online: bool = True
    info: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"online": self.online, **self.info}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> State:
        online = _require(obj, "online")
        if not isinstance(online, bool):
            raise ProtocolError(Code.BAD_FIELD, "field 'online' must be true or false")
        reserved = {"v", "type", "device", "seq", "ts", "online"}
        return cls(**base, online=online, info={k: v for k, v in obj.items() if k not in reserved})


@dataclass(frozen=True)
class Telemetry(DeviceMessage):
    """Periodic metrics: model, counts, latency percentiles, accuracy, system."""

    TYPE: ClassVar[str] = "telemetry"
    metrics: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"metrics": self.metrics}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> Telemetry:
        return cls(**base, metrics=_dict(obj, "metrics"))


DEVICE_MESSAGES: Dict[str, Type[DeviceMessage]] = {
    c.TYPE: c for c in (Error, Progress, Missing, Deployed, Rejected, Result, State, Telemetry)
}


def will_payload(device_id: str) -> bytes:
    """The Last Will: a retained state saying the device is offline (no seq: it is fixed at connect)."""
    return _encode({"v": SCHEMA_VERSION, "type": "state", "device": device_id, "online": False})


def parse_device_message(payload: bytes, *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> DeviceMessage:
    """Decode a device → host message (the host side's `from_wire`); Last Will payloads get seq -1."""
    obj = decode_json(payload, max_bytes=max_bytes)
    _check_version(obj)
    kind = _str(obj, "type", max_len=64)
    cls = DEVICE_MESSAGES.get(kind)
    if cls is None:
        raise ProtocolError(Code.UNKNOWN_TYPE, f"unknown device message type {kind!r}")
    is_will = kind == "state" and obj.get("online") is False and "seq" not in obj
    base = {
        "device": _str(obj, "device", max_len=128),
        "seq": -1 if is_will else _int(obj, "seq"),
        "ts": 0.0 if is_will else _num(obj, "ts"),
    }
    return cls._parse(obj, base)


def ranges_of(indexes: List[int]) -> List[List[int]]:
    """Compress sorted chunk indexes into inclusive `[start, end]` ranges."""
    out: List[List[int]] = []
    for i in indexes:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


def encode_array(array: Any) -> Dict[str, Any]:
    """Encode a numpy array as `{dtype, shape, data}` for JSON messages (infer over MQTT)."""
    return {
        "dtype": str(array.dtype),
        "shape": list(array.shape),
        "data": base64.b64encode(array.tobytes()).decode("ascii"),
    }


def decode_array(spec: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> Any:
    """Decode `{dtype, shape, data}` into a numpy array, checking the byte count against the shape."""
    import numpy as np

    if not isinstance(spec, Mapping):
        raise ProtocolError(Code.BAD_FIELD, "an array must be an object with dtype, shape and data")
    name = _str(spec, "dtype", max_len=16)
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError):
        raise ProtocolError(Code.BAD_FIELD, f"dtype {name!r} is not a numpy dtype") from None
    if dtype.kind not in "biuf":
        raise ProtocolError(Code.BAD_FIELD, f"dtype {dtype} is not numeric")
    dims = _list(spec, "shape", max_len=32)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ProtocolError(Code.BAD_FIELD, "field 'shape' must list non-negative integers")
    raw = _b64(spec, "data")
    shape = tuple(dims)
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(raw) or len(raw) > max_bytes:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"data has {len(raw)} bytes but shape {list(shape)} of {dtype} needs {count * dtype.itemsize}",
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)
