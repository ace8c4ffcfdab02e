"""JSON encoding, schema versions and field validation shared by every message of the contract.

Every control message is a JSON object with `v` (the major schema version of its kind) and `type`. A
reader accepts every major version up to its own and refuses a newer one with `unsupported-version`
(a newer major changed the meaning of something). Additive changes keep the major: a key this side does
not know is kept in the message's `extra` mapping and written back by `to_wire`, never dropped.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from typing import Any, Callable, ClassVar, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type, TypeVar

from edgefleet.agent.core.codes import Code
from edgefleet.agent.core.errors import ProtocolError

# The version today's commands and events carry; a kind whose layout changed has its own `VERSION`.
SCHEMA_VERSION = 1
# A control message larger than this is refused unread; deploy commands are a few KiB.
DEFAULT_MAX_CONTROL_BYTES = 1 << 20
# Keys every message carries around its own fields.
ENVELOPE: FrozenSet[str] = frozenset({"v", "type"})

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def valid_name(value: str) -> bool:
    """Whether `value` may appear as one MQTT topic level (device id, fleet name)."""
    return bool(_NAME_RE.match(value))


def valid_sha256(value: str) -> bool:
    """Whether `value` is a lowercase hex sha256 digest."""
    return bool(_SHA_RE.match(value))


# ---------------------------------------------------------------------------------------------------
# Field readers: each names the field and what was expected, so Error events are actionable.


def require(obj: Mapping[str, Any], key: str) -> Any:
    """The value of a mandatory field."""
    if key not in obj:
        raise ProtocolError(Code.MISSING_FIELD, f"field {key!r} is missing")
    return obj[key]


def get_str(obj: Mapping[str, Any], key: str, *, optional: bool = False, max_len: int = 4096) -> Any:
    """A string field (None when optional and absent or null)."""
    if optional and obj.get(key) is None:
        return None
    value = require(obj, key)
    if not isinstance(value, str) or len(value) > max_len:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a string of at most {max_len} characters")
    return value


def get_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0, maximum: int = 1 << 62) -> int:
    """An integer field within [minimum, maximum]."""
    value = require(obj, key)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be an integer in [{minimum}, {maximum}]")
    return value


def opt_int(obj: Mapping[str, Any], key: str, *, minimum: int = 0, maximum: int = 1 << 62) -> Optional[int]:
    """An optional integer field: None when absent or null."""
    if obj.get(key) is None:
        return None
    return get_int(obj, key, minimum=minimum, maximum=maximum)


def get_num(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[float]:
    """A finite number field (None when optional and absent or null)."""
    if optional and obj.get(key) is None:
        return None
    value = require(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a number")
    return float(value)


def get_bool(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Optional[bool]:
    """A true/false field (None when optional and absent or null)."""
    if optional and obj.get(key) is None:
        return None
    value = require(obj, key)
    if not isinstance(value, bool):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be true or false")
    return value


def get_dict(obj: Mapping[str, Any], key: str, *, optional: bool = False) -> Dict[str, Any]:
    """A JSON object field ({} when optional and absent or null)."""
    if optional and obj.get(key) is None:
        return {}
    value = require(obj, key)
    if not isinstance(value, dict):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a JSON object")
    return value


def get_list(obj: Mapping[str, Any], key: str, *, max_len: int = 1 << 20) -> List[Any]:
    """A list field of at most `max_len` items."""
    value = require(obj, key)
    if not isinstance(value, list) or len(value) > max_len:
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a list of at most {max_len} items")
    return value


def get_strs(obj: Mapping[str, Any], key: str, *, max_len: int = 256) -> Tuple[str, ...]:
    """An optional list of short strings (() when absent or null)."""
    if obj.get(key) is None:
        return ()
    items = get_list(obj, key, max_len=max_len)
    if not all(isinstance(i, str) and len(i) <= 256 for i in items):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must list strings")
    return tuple(items)


def get_sha(obj: Mapping[str, Any], key: str) -> str:
    """A lowercase hex sha256 field."""
    value = get_str(obj, key)
    if not valid_sha256(value):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be a lowercase hex sha256 digest")
    return str(value)


def get_b64(obj: Mapping[str, Any], key: str) -> bytes:
    """A standard base64 field, decoded."""
    value = get_str(obj, key, max_len=DEFAULT_MAX_CONTROL_BYTES * 2)
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise ProtocolError(Code.BAD_FIELD, f"field {key!r} must be standard base64") from None


def b64(data: bytes) -> str:
    """Standard base64 text of `data`."""
    return base64.b64encode(data).decode("ascii")


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


def encode_json(obj: Mapping[str, Any]) -> bytes:
    """Compact, key-sorted JSON bytes (NaN refused): the one encoding of every control message."""
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, allow_nan=False).encode("utf-8")


def check_version(obj: Mapping[str, Any], kind: str, supported: int) -> int:
    """The message's major version `v`; refuses a missing, malformed or newer one with a clear code."""
    version = require(obj, "v")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ProtocolError(
            Code.UNSUPPORTED_VERSION, f"schema version {version!r} is not a version this side knows"
        )
    if version > supported:
        raise ProtocolError(
            Code.UNSUPPORTED_VERSION,
            f"{kind!r} message has schema v{version}, newer than the v{supported} this side speaks: "
            "upgrade this side (agent or edgefleet) to read it",
        )
    return version


def split_extra(obj: Mapping[str, Any], known: FrozenSet[str]) -> Dict[str, Any]:
    """The keys of `obj` a newer writer added (not in `known` nor the envelope), kept to be sent on."""
    return {k: v for k, v in obj.items() if k not in known and k not in ENVELOPE}


# ---------------------------------------------------------------------------------------------------
# The registry: every dataclass that travels on the wire, so tests cover a new one automatically.

W = TypeVar("W")
MESSAGE_CLASSES: Dict[str, Type[Any]] = {}


def wire_class(cls: Type[W]) -> Type[W]:
    """Class decorator: register a wire dataclass (message or part) under its class name."""
    MESSAGE_CLASSES[cls.__name__] = cls
    return cls


class WirePart:
    """Mixin of a nested wire object: `KEYS` it knows, `to_obj()` and `from_obj()`; unknown keys in `extra`."""

    KEYS: ClassVar[FrozenSet[str]] = frozenset()
    extra: Dict[str, Any]

    def _fields(self) -> Dict[str, Any]:
        return {}

    def to_obj(self) -> Dict[str, Any]:
        """Plain JSON object (keys a newer writer added come back out unchanged)."""
        return {**self.extra, **self._fields()}

    @classmethod
    def from_obj(cls: Type[W], obj: Any) -> W:
        """Parse one JSON object of this part."""
        if not isinstance(obj, dict):
            raise ProtocolError(Code.BAD_FIELD, f"{cls.__name__} must be a JSON object")
        return cls._parse(obj, split_extra(obj, cls.KEYS))  # type: ignore[attr-defined]


def part_or_none(obj: Mapping[str, Any], key: str, parse: Callable[[Any], W]) -> Optional[W]:
    """A nested part that may be absent or null."""
    return None if obj.get(key) is None else parse(obj[key])


# ---------------------------------------------------------------------------------------------------
# Arrays inside JSON messages (infer over MQTT) and chunk ranges.


def encode_array(array: Any) -> Dict[str, Any]:
    """Encode a numpy array as `{dtype, shape, data}` for JSON messages (infer over MQTT)."""
    return {"dtype": str(array.dtype), "shape": list(array.shape), "data": b64(array.tobytes())}


def decode_array(spec: Mapping[str, Any], *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES) -> Any:
    """Decode `{dtype, shape, data}` into a numpy array, checking the byte count against the shape."""
    import numpy as np

    if not isinstance(spec, Mapping):
        raise ProtocolError(Code.BAD_FIELD, "an array must be an object with dtype, shape and data")
    name = get_str(spec, "dtype", max_len=16)
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError):
        raise ProtocolError(Code.BAD_FIELD, f"dtype {name!r} is not a numpy dtype") from None
    if dtype.kind not in "biuf":
        raise ProtocolError(Code.BAD_FIELD, f"dtype {dtype} is not numeric")
    dims = get_list(spec, "shape", max_len=32)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ProtocolError(Code.BAD_FIELD, "field 'shape' must list non-negative integers")
    raw = get_b64(spec, "data")
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


def ranges_of(indexes: List[int]) -> List[List[int]]:
    """Compress sorted chunk indexes into inclusive `[start, end]` ranges."""
    out: List[List[int]] = []
    for i in indexes:
        if out and out[-1][1] == i - 1:
            out[-1][1] = i
        else:
            out.append([i, i])
    return out


__all__ = [
    "DEFAULT_MAX_CONTROL_BYTES",
    "ENVELOPE",
    "MESSAGE_CLASSES",
    "SCHEMA_VERSION",
    "WirePart",
    "b64",
    "check_version",
    "decode_array",
    "decode_json",
    "encode_array",
    "encode_json",
    "get_b64",
    "get_bool",
    "get_dict",
    "get_int",
    "get_list",
    "get_num",
    "get_sha",
    "get_str",
    "get_strs",
    "opt_int",
    "part_or_none",
    "ranges_of",
    "require",
    "split_extra",
    "valid_name",
    "valid_sha256",
    "wire_class",
]
