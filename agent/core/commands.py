"""Host → device commands on `dev/{id}/cmd`: deploy (with each file's transfer and delta), rollback, eval,
status, config, infer and rotate-root, with their JSON encoding and validation."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type, TypeVar, Union

from edgefleet.agent.core.codes import Code
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.wire import (
    DEFAULT_MAX_CONTROL_BYTES,
    SCHEMA_VERSION,
    WirePart,
    b64,
    check_version,
    decode_json,
    encode_json,
    get_b64,
    get_dict,
    get_int,
    get_list,
    get_num,
    get_sha,
    get_str,
    split_extra,
    valid_sha256,
    wire_class,
)

C = TypeVar("C", bound="Command")
DELTA_FORMATS = ("bsdiff4",)


@dataclass(frozen=True)
class Command:
    """Base of host → device commands; `id` correlates the events that answer it."""

    TYPE: ClassVar[str] = ""
    VERSION: ClassVar[int] = SCHEMA_VERSION
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id"})
    id: str
    # Keys a newer host added that this side does not know: kept, and sent on by to_wire.
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {}

    def to_obj(self) -> Dict[str, Any]:
        """Plain JSON object."""
        return {**self.extra, "v": self.VERSION, "type": self.TYPE, "id": self.id, **self._fields()}

    def to_wire(self) -> bytes:
        """Encode as a JSON payload."""
        return encode_json(self.to_obj())

    @classmethod
    def from_wire(cls: Type[C], payload: bytes) -> C:
        """Decode a payload that must be this command."""
        cmd = parse_command(payload)
        if not isinstance(cmd, cls):
            raise ProtocolError(Code.UNKNOWN_TYPE, f"expected a {cls.TYPE!r} command, got {cmd.TYPE!r}")
        return cmd

    @classmethod
    def _parse(cls: Type[C], obj: Mapping[str, Any], base: Dict[str, Any]) -> C:
        return cls(**base)


def _digest_list(obj: Mapping[str, Any], key: str, name: str, chunks: int) -> Tuple[str, ...]:
    """An optional list of one sha256 per chunk under `key`, or ()."""
    if obj.get(key) is None:
        return ()
    raw = get_list(obj, key)
    if len(raw) != chunks or not all(isinstance(d, str) and valid_sha256(d) for d in raw):
        raise ProtocolError(Code.BAD_FIELD, f"file {name!r}: {key!r} must list one sha256 per chunk")
    return tuple(raw)


# Bounds on how a file is cut: every chunk costs the device per-chunk bookkeeping (bitmap bits, missing
# ranges, a message), so a tiny chunk size on a large file (chunk_size 1 drove an agent from 91 MB to
# 949 MB) is refused when the command is parsed. 65,536 chunks of the host's 256 KiB default is 16 GiB.
MIN_CHUNK_BYTES = 64
MAX_CHUNK_BYTES = 64 << 20
MAX_CHUNKS_PER_FILE = 1 << 16


def _chunking(obj: Mapping[str, Any], name: str) -> Tuple[int, int, int]:
    """(size, chunk_size, chunks), checked to agree and to stay within the chunk bounds."""
    size = get_int(obj, "size")
    chunk_size = get_int(obj, "chunk_size", minimum=1, maximum=MAX_CHUNK_BYTES)
    chunks = get_int(obj, "chunks", maximum=1 << 31)
    # A file no larger than the minimum may be cut any way: at most MIN_CHUNK_BYTES chunks.
    if chunk_size < MIN_CHUNK_BYTES and size > MIN_CHUNK_BYTES:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"file {name!r}: chunk_size {chunk_size} is below the minimum of {MIN_CHUNK_BYTES} bytes; "
            "deploy with a larger --chunk-size",
        )
    if chunks > MAX_CHUNKS_PER_FILE:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"file {name!r}: {chunks} chunks is over the limit of {MAX_CHUNKS_PER_FILE} per file; "
            "deploy with a larger --chunk-size",
        )
    expected = -(-size // chunk_size)
    if chunks != expected:
        raise ProtocolError(
            Code.BAD_FIELD,
            f"file {name!r}: {size} bytes in chunks of {chunk_size} make {expected} chunks, not {chunks}",
        )
    return size, chunk_size, chunks


@wire_class
@dataclass(frozen=True)
class DeltaSpec(WirePart):
    """A bsdiff4 patch against a file the device already has (`base_sha256`), sent in place of the file.

    Unsigned: the file rebuilt from it must match the signed sha256 of the file it stands for. An agent
    that cannot use it (no base, unknown format) downloads the full file.
    """

    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"format", "base_sha256", "sha256", "size", "chunk_size", "chunks", "chunk_sha256", "prefix_sha256"}
    )
    base_sha256: str = ""
    sha256: str = ""
    size: int = 0
    chunk_size: int = 1
    chunks: int = 0
    chunk_sha256: Tuple[str, ...] = ()
    prefix_sha256: Tuple[str, ...] = ()
    format: str = "bsdiff4"
    extra: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        obj: Dict[str, Any] = {
            "format": self.format,
            "base_sha256": self.base_sha256,
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": self.chunks,
        }
        if self.chunk_sha256:
            obj["chunk_sha256"] = list(self.chunk_sha256)
        if self.prefix_sha256:
            obj["prefix_sha256"] = list(self.prefix_sha256)
        return obj

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> DeltaSpec:
        fmt = get_str(obj, "format", max_len=32)
        if fmt not in DELTA_FORMATS:
            raise ProtocolError(
                Code.BAD_FIELD, f"'delta.format' {fmt!r} must be one of {list(DELTA_FORMATS)}"
            )
        size, chunk_size, chunks = _chunking(obj, "delta")
        sha = get_sha(obj, "sha256")
        prefixes = _digest_list(obj, "prefix_sha256", "delta", chunks)
        if prefixes and prefixes[-1] != sha:
            raise ProtocolError(Code.BAD_FIELD, "the delta's last 'prefix_sha256' must be its sha256")
        return cls(
            base_sha256=get_sha(obj, "base_sha256"),
            sha256=sha,
            size=size,
            chunk_size=chunk_size,
            chunks=chunks,
            chunk_sha256=_digest_list(obj, "chunk_sha256", "delta", chunks),
            prefix_sha256=prefixes,
            format=fmt,
            extra=extra,
        )

    def transfer(self, target: FileTransfer) -> FileTransfer:
        """How the patch for `target` travels: a FileTransfer of its own, named `<file>.<format>`."""
        if self.size > target.size * 2 + (1 << 20):
            raise ProtocolError(
                Code.BAD_FIELD, f"file {target.file!r}: the delta is larger than any useful patch"
            )
        return FileTransfer(
            f"{target.file}.{self.format}",
            self.sha256,
            self.size,
            self.chunk_size,
            self.chunks,
            self.chunk_sha256,
            self.prefix_sha256,
        )


@wire_class
@dataclass(frozen=True)
class FileTransfer(WirePart):
    """How one bundle file travels: its signed hash and size, and how it is cut into chunks."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {
            "file",
            "sha256",
            "size",
            "chunk_size",
            "chunks",
            "chunk_sha256",
            "prefix_sha256",
            "delta",
            "hashes_sha256",
        }
    )
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
    # Optional patch against a file the device already has. Not part of equality: a resumed download
    # of the same file is the same transfer whichever way the host offered it.
    delta: Optional[DeltaSpec] = field(default=None, compare=False)
    extra: Dict[str, Any] = field(default_factory=dict, compare=False)
    # Instead of the lists above: the sha256 of the file's hash index (`hashes_payload`), which the host
    # publishes once per file, retained, on `Topics.hashes(fleet, sha256)`. The command's size then does
    # not grow with the file; an agent that predates this key downloads without per-chunk hints and the
    # signed whole-file sha256 still decides.
    hashes_sha256: Optional[str] = field(default=None, compare=False)

    def _fields(self) -> Dict[str, Any]:
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
            obj["delta"] = self.delta.to_obj()
        if self.hashes_sha256 is not None:
            obj["hashes_sha256"] = self.hashes_sha256
        return obj

    @classmethod
    def from_obj(cls, obj: Any) -> FileTransfer:
        """Parse and check that size, chunk size and chunk count agree."""
        if not isinstance(obj, dict):
            raise ProtocolError(Code.BAD_FIELD, "every entry of 'files' must be a JSON object")
        return cls._parse(obj, split_extra(obj, cls.KEYS))

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], extra: Dict[str, Any]) -> FileTransfer:
        name = get_str(obj, "file", max_len=255)
        parts = name.split("/")
        if "\\" in name or name.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ProtocolError(Code.BAD_FIELD, f"file name {name!r} must be a relative path without '..'")
        size, chunk_size, chunks = _chunking(obj, name)
        digests = _digest_list(obj, "chunk_sha256", name, chunks)
        sha256 = get_sha(obj, "sha256")
        prefixes = _digest_list(obj, "prefix_sha256", name, chunks)
        if prefixes and prefixes[-1] != sha256:
            raise ProtocolError(
                Code.BAD_FIELD,
                f"file {name!r}: the last 'prefix_sha256' must be the file's sha256; the host built it wrong",
            )
        delta: Optional[DeltaSpec] = None
        if obj.get("delta") is not None:
            try:
                delta = DeltaSpec.from_obj(obj["delta"])
            except ProtocolError:
                # A delta this agent cannot use (a newer format, a broken one) only costs the full
                # download; it travels on untouched in `extra`.
                extra = {**extra, "delta": obj["delta"]}
        index = get_sha(obj, "hashes_sha256") if obj.get("hashes_sha256") is not None else None
        return cls(name, sha256, size, chunk_size, chunks, digests, prefixes, delta, extra, index)

    def with_hashes(self, payload: bytes) -> FileTransfer:
        """This transfer with the per-chunk lists of its published hash index; ProtocolError when the payload
        is not the index this command names (its sha256) or does not fit the file."""
        import hashlib
        from dataclasses import replace

        if self.hashes_sha256 is None or hashlib.sha256(payload).hexdigest() != self.hashes_sha256:
            raise ProtocolError(
                Code.BAD_FIELD, f"file {self.file!r}: the hash index does not match its sha256"
            )
        obj = decode_json(payload, max_bytes=len(payload) + 1)
        digests = _digest_list(obj, "chunk_sha256", self.file, self.chunks)
        prefixes = _digest_list(obj, "prefix_sha256", self.file, self.chunks)
        if prefixes and prefixes[-1] != self.sha256:
            raise ProtocolError(Code.BAD_FIELD, f"file {self.file!r}: the hash index ends on another sha256")
        return replace(self, chunk_sha256=digests, prefix_sha256=prefixes)


def hashes_payload(chunk_sha256: Any, prefix_sha256: Any) -> bytes:
    """The hash index of one file as published once per file (canonical JSON; its sha256 is in the command)."""
    return json.dumps(
        {"chunk_sha256": list(chunk_sha256), "prefix_sha256": list(prefix_sha256)}, separators=(",", ":")
    ).encode()


@wire_class
@dataclass(frozen=True)
class DeployCommand(Command):
    """Install a signed bundle: canonical manifest bytes, their signatures, and how each file travels."""

    TYPE: ClassVar[str] = "deploy"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "manifest", "signatures", "files", "device"})
    manifest: bytes = b""
    signatures: Dict[str, Any] = field(default_factory=dict)
    files: Tuple[FileTransfer, ...] = ()
    device: Optional[str] = None

    def _fields(self) -> Dict[str, Any]:
        obj: Dict[str, Any] = {
            "manifest": b64(self.manifest),
            "signatures": self.signatures,
            "files": [f.to_obj() for f in self.files],
        }
        if self.device is not None:
            obj["device"] = self.device
        return obj

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> DeployCommand:
        files = tuple(FileTransfer.from_obj(f) for f in get_list(obj, "files", max_len=64))
        if not files:
            raise ProtocolError(Code.BAD_FIELD, "field 'files' must name at least one file")
        if len({f.file for f in files}) != len(files):
            raise ProtocolError(Code.BAD_FIELD, "field 'files' names a file twice")
        return cls(
            **base,
            manifest=get_b64(obj, "manifest"),
            signatures=get_dict(obj, "signatures"),
            files=files,
            device=get_str(obj, "device", optional=True, max_len=128),
        )


@wire_class
@dataclass(frozen=True)
class RollbackCommand(Command):
    """Return to the previous slot's model.

    `abandon` (name, version) names the model being rolled back (a rollout's abort sends it): where the
    device has no previous model and that model serves, it stops serving it (requests answer `no-model`)
    instead of keeping it. An agent that predates the key ignores it (and answers `no-previous`).
    """

    TYPE: ClassVar[str] = "rollback"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "abandon"})
    abandon: Optional[Tuple[str, int]] = None

    def _fields(self) -> Dict[str, Any]:
        if self.abandon is None:
            return {}
        return {"abandon": {"name": self.abandon[0], "version": self.abandon[1]}}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> RollbackCommand:
        if obj.get("abandon") is None:
            return cls(**base)
        model = get_dict(obj, "abandon")
        return cls(**base, abandon=(str(get_str(model, "name", max_len=128)), get_int(model, "version")))


@wire_class
@dataclass(frozen=True)
class EvalCommand(Command):
    """Measure the active model on its bundle's eval set now and report it on `evt`."""

    TYPE: ClassVar[str] = "eval"


@wire_class
@dataclass(frozen=True)
class StatusCommand(Command):
    """Re-publish the retained `state` message and answer with the install status on `evt`."""

    TYPE: ClassVar[str] = "status"


@wire_class
@dataclass(frozen=True)
class ConfigCommand(Command):
    """Change run-time settings (for now the telemetry interval)."""

    TYPE: ClassVar[str] = "config"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "telemetry_interval_s"})
    telemetry_interval_s: Optional[float] = None

    def _fields(self) -> Dict[str, Any]:
        return (
            {} if self.telemetry_interval_s is None else {"telemetry_interval_s": self.telemetry_interval_s}
        )

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> ConfigCommand:
        interval = get_num(obj, "telemetry_interval_s", optional=True)
        if interval is not None and not 0.1 <= interval <= 86400:
            raise ProtocolError(
                Code.BAD_FIELD, "field 'telemetry_interval_s' must be in [0.1, 86400] seconds"
            )
        return cls(**base, telemetry_interval_s=interval)


@wire_class
@dataclass(frozen=True)
class InferCommand(Command):
    """Run one inference remotely; inputs are `{name: {dtype, shape, data (base64)}}`."""

    TYPE: ClassVar[str] = "infer"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "inputs"})
    inputs: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"inputs": self.inputs}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> InferCommand:
        inputs = get_dict(obj, "inputs")
        for name, spec in inputs.items():
            if not isinstance(spec, dict):
                raise ProtocolError(
                    Code.BAD_FIELD, f"input {name!r} must be an object with dtype, shape, data"
                )
            get_str(spec, "dtype", max_len=16)
            shape = get_list(spec, "shape", max_len=16)
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise ProtocolError(
                    Code.BAD_FIELD, f"input {name!r}: 'shape' must list non-negative integers"
                )
            get_b64(spec, "data")
        return cls(**base, inputs=dict(inputs))


# A rotation carries at most this many signatures (the agent's trust store refuses more, too).
MAX_ROTATION_SIGNATURES = 64


@wire_class
@dataclass(frozen=True)
class RotateRootCommand(Command):
    """Trust a new fleet root (key rotation): its canonical bytes and the signatures over them.

    The device applies it only when it is exactly one root version newer and signed by the threshold
    of both the current and the new root (agent/core/trust.py `TrustStore.apply_root`); `root` travels as
    the exact signed bytes, like a deploy's manifest, so no re-encoding can change what was signed.
    """

    TYPE: ClassVar[str] = "rotate-root"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "root", "signatures"})
    root: bytes = b""
    signatures: Tuple[Dict[str, str], ...] = ()

    def _fields(self) -> Dict[str, Any]:
        return {
            "root": b64(self.root),
            "signatures": [{"keyid": s["keyid"], "sig": s["sig"]} for s in self.signatures],
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> RotateRootCommand:
        entries = get_list(obj, "signatures", max_len=MAX_ROTATION_SIGNATURES)
        signatures: List[Dict[str, str]] = []
        for entry in entries:
            if not isinstance(entry, dict):
                raise ProtocolError(Code.BAD_FIELD, "field 'signatures' must list {keyid, sig} objects")
            signatures.append(
                {"keyid": get_str(entry, "keyid", max_len=128), "sig": get_str(entry, "sig", max_len=256)}
            )
        root = get_b64(obj, "root")
        if not root:
            raise ProtocolError(Code.BAD_FIELD, "field 'root' must hold the canonical root document")
        return cls(**base, root=root, signatures=tuple(signatures))


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
    check_version(obj, "command", max(c.VERSION for c in COMMANDS.values()))
    kind = get_str(obj, "type", max_len=64)
    cls = COMMANDS.get(kind)
    if cls is None:
        raise ProtocolError(
            Code.UNKNOWN_TYPE, f"unknown command type {kind!r}; known: {', '.join(sorted(COMMANDS))}"
        )
    check_version(obj, kind, cls.VERSION)
    base = {"id": get_str(obj, "id", max_len=128), "extra": split_extra(obj, cls.KEYS)}
    return cls._parse(obj, base)


def command_id_of(payload: bytes) -> Optional[str]:
    """Best-effort id of a (possibly malformed) command, so an Error event can point back at it."""
    try:
        obj = json.loads(payload[:DEFAULT_MAX_CONTROL_BYTES].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    value = obj.get("id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) and len(value) <= 128 else None


__all__ = [
    "COMMANDS",
    "DELTA_FORMATS",
    "MAX_ROTATION_SIGNATURES",
    "AnyCommand",
    "Command",
    "ConfigCommand",
    "DeltaSpec",
    "DeployCommand",
    "EvalCommand",
    "FileTransfer",
    "InferCommand",
    "RollbackCommand",
    "RotateRootCommand",
    "StatusCommand",
    "command_id_of",
    "parse_command",
]
