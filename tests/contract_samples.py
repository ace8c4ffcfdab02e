"""One instance of every wire class with every field set to a value other than its default.

Built from the dataclass fields and their type hints, so a field added to any class registered in
`edgefleet.agent.core.wire.MESSAGE_CLASSES` gets a sample without touching this file; only fields with
rules (hashes, chunk counts) have an explicit value below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from typing import Any

import numpy as np

from edgefleet.agent.core import commands, events, parts
from edgefleet.agent.core.protocol import encode_array
from edgefleet.agent.core.quality import Quality
from edgefleet.agent.core.wire import MESSAGE_CLASSES

# Fields whose only valid value is their default (nothing else to send yet).
ONLY_DEFAULT = {("DeltaSpec", "format")}
# What a newer writer might add: every sample carries it in `extra`, so every class shows it keeps it.
NEWER = {"x_newer_field": {"nested": [1, "two"]}}

SHA_A = hashlib.sha256(b"a").hexdigest()
SHA_B = hashlib.sha256(b"b").hexdigest()
SHA_C = hashlib.sha256(b"c").hexdigest()


def _overrides() -> dict[tuple[str, str], Any]:
    return {
        ("FileTransfer", "file"): "model.onnx",
        ("FileTransfer", "sha256"): SHA_B,
        ("FileTransfer", "size"): 10,
        ("FileTransfer", "chunk_size"): 4,
        ("FileTransfer", "chunks"): 3,
        ("FileTransfer", "chunk_sha256"): (SHA_A, SHA_C, SHA_A),
        ("FileTransfer", "prefix_sha256"): (SHA_A, SHA_C, SHA_B),
        ("FileTransfer", "hashes_sha256"): SHA_C,
        ("DeltaSpec", "base_sha256"): SHA_A,
        ("DeltaSpec", "sha256"): SHA_C,
        ("DeltaSpec", "size"): 5,
        ("DeltaSpec", "chunk_size"): 4,
        ("DeltaSpec", "chunks"): 2,
        ("DeltaSpec", "chunk_sha256"): (SHA_A, SHA_B),
        ("DeltaSpec", "prefix_sha256"): (SHA_A, SHA_C),
        ("Missing", "sha256"): SHA_A,
        ("ConfigCommand", "telemetry_interval_s"): 2.5,
        ("InferCommand", "inputs"): {"x": encode_array(np.arange(6, dtype=np.float32).reshape(2, 3))},
        ("RotateRootCommand", "signatures"): ({"keyid": "k1", "sig": "c2ln"},),
        ("State", "http_port"): 8080,
        ("Telemetry", "quality"): (
            Quality("accuracy", 0.5, samples=64, source="eval", detail={"agreement": 0.75}),
            Quality("accuracy", 0.25, samples=4, source="feedback"),
        ),
    }


def value_for(owner: str, name: str, hint: Any) -> Any:
    """A non-default value of type `hint` for field `name` of class `owner`."""
    overrides = _overrides()
    if (owner, name) in overrides:
        return overrides[(owner, name)]
    if name == "extra":
        return dict(NEWER)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:  # Optional[X]
        return value_for(owner, name, next(a for a in args if a is not type(None)))
    if hint is bool:
        return None  # decided against the default by the caller
    if hint is int:
        return 7
    if hint is float:
        return 1.5
    if hint is str:
        return f"s-{name}"
    if hint is bytes:
        return b"signed bytes"
    if hint is Quality:
        return Quality("fidelity", 0.875, samples=3, source="shadow")
    if isinstance(hint, type) and hint.__name__ in MESSAGE_CLASSES:
        return sample(hint)
    if origin in (tuple, typing.Tuple):
        if len(args) == 2 and args[1] is Ellipsis:
            return (value_for(owner, name, args[0]),)
        return tuple(value_for(owner, name, a) for a in args)
    if origin in (dict, typing.Dict):
        return {"k": value_for(owner, name, args[1]) if args[1] is not Any else 1}
    if hint is Any:
        return {"any": 1}
    raise TypeError(f"{owner}.{name}: no sample for type {hint!r}; add one to tests/contract_samples.py")


def _hints(cls: type) -> dict[str, Any]:
    namespace = {**vars(commands), **vars(events), **vars(parts), "Quality": Quality}
    return typing.get_type_hints(cls, globalns=namespace)


def sample(cls: type) -> Any:
    """An instance of `cls` with every field (but ONLY_DEFAULT ones) unlike its default."""
    hints = _hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if (cls.__name__, f.name) in ONLY_DEFAULT:
            continue
        value = value_for(cls.__name__, f.name, hints[f.name])
        if value is None and hints[f.name] in (bool, typing.Optional[bool]):
            default = f.default if f.default is not dataclasses.MISSING else None
            value = not default if default is not None else True
        values[f.name] = value
    return cls(**values)


def defaults_left(obj: Any) -> list[str]:
    """Fields of `obj` still at their default (the sample failed to vary them)."""
    left = []
    for f in dataclasses.fields(obj):
        if (type(obj).__name__, f.name) in ONLY_DEFAULT:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(obj, f.name) == default:
            left.append(f.name)
    return left
