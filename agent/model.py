"""The models a device serves: what is active, one loaded runtime session, one inference's result.

`LoadedModel` wraps a runtime session and checks a caller's inputs against the model's (a fast path
for inputs that already fit, a slow path that names exactly what does not); `ModelServer` in
`edgefleet.agent.server` routes requests to the active one.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.runtimes.base import Runtime, TensorInfo

if TYPE_CHECKING:
    import numpy as np

    Inputs = Union[Mapping[str, np.ndarray], np.ndarray]


class InferError(AgentError):
    """An inference request failed: no model, inputs that do not fit the model, or a runtime error."""

    default_code = "infer-failed"


def _no_model() -> InferError:
    return InferError("no-model", "no model is installed yet; deploy a bundle to this device")


@dataclass(frozen=True)
class ActiveModel:
    """What is serving: model name and version, slot, runtime, providers and tensor specs."""

    name: str
    version: int
    slot: str
    runtime: str
    providers: Tuple[str, ...]
    inputs: Tuple[TensorInfo, ...]
    outputs: Tuple[TensorInfo, ...]
    path: str
    loaded_at: float

    @property
    def output_names(self) -> Tuple[str, ...]:
        """The outputs' names in order."""
        return tuple(t.name for t in self.outputs)

    def to_dict(self) -> Dict[str, Any]:
        """JSON form."""
        return {
            "name": self.name,
            "version": self.version,
            "slot": self.slot,
            "runtime": self.runtime,
            "providers": list(self.providers),
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "loaded_at": round(self.loaded_at, 3),
        }


class InferResult:
    """One inference: outputs by name, the request id and which model answered, and its latency.

    Built on every request, so it stores what it was handed and does the rest when read: the outputs
    dict is made on first access, a server-made id is formatted on read.
    """

    __slots__ = ("_id", "_info", "_out", "latency_ms")

    def __init__(
        self,
        outputs: Union[Dict[str, np.ndarray], Sequence[np.ndarray]],
        request_id: Union[str, Tuple[str, int]],
        model: ActiveModel,
        latency_ms: float,
    ) -> None:
        self._out = outputs
        self._id = request_id
        self._info = model
        self.latency_ms = latency_ms

    @property
    def outputs(self) -> Dict[str, np.ndarray]:
        """The model's outputs by name, in the model's order."""
        out = self._out
        if isinstance(out, dict):
            return out
        names = self._info.output_names
        built: Dict[str, np.ndarray] = {names[0]: out[0]} if len(names) == 1 else dict(zip(names, out))
        self._out = built
        return built

    @property
    def model_name(self) -> str:
        """The name of the model that answered."""
        return self._info.name

    @property
    def model_version(self) -> int:
        """The version of the model that answered."""
        return self._info.version

    @property
    def request_id(self) -> str:
        """The caller's id, or one the server made up (formatted only when read)."""
        rid = self._id
        return rid if isinstance(rid, str) else f"{rid[0]}-{rid[1]}"

    def __repr__(self) -> str:
        return f"InferResult({self.request_id!r}, {self.model_name} v{self.model_version}, {self.latency_ms:.3f} ms)"


@dataclass(eq=False)
class LoadedModel:
    """A model loaded in a runtime session, serving or not; its runtime closes when the last reference goes."""

    info: ActiveModel
    runtime: Runtime
    dtypes: Dict[str, Any]
    _checks: List[Tuple[str, Any, int, Optional[Tuple[int, ...]]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        import numpy as np

        self._ndarray = np.ndarray
        self._single = self.info.inputs[0].name if len(self.info.inputs) == 1 else None
        self._output_names = tuple(t.name for t in self.info.outputs)
        # One output (a classifier, an encoder) is the common case: a dict display beats dict(zip()).
        self._only_output = self._output_names[0] if len(self._output_names) == 1 else None
        # The runtime's cheapest call (onnxruntime: the C-level run; prepare() already did its checks).
        self.call: Callable[[Mapping[str, np.ndarray]], List[np.ndarray]] = self.runtime.runner()
        # The finalizer holds the runtime, never the model, so it cannot keep the model alive.
        self._finalizer = weakref.finalize(self, self.runtime.close)
        self._checks = []
        for spec in self.info.inputs:
            shape = spec.shape or ()
            tail = shape[1:]
            # With rank >= 2 and a fully known tail, `shape[1:] == tail` alone also proves the rank.
            fixed = None if len(shape) < 2 or any(d is None for d in tail) else tuple(int(d) for d in tail)  # type: ignore[arg-type]
            self._checks.append((spec.name, self.dtypes[spec.name], len(shape), fixed))
        self._check_one = self._checks[0] if len(self._checks) == 1 else None
        # (name, dtype, tail shape) of a one-input model whose shape is known but for the batch: the
        # case ModelServer.infer checks inline, saving a call per request; prepare() does the rest.
        one = self._check_one
        self.fit: Optional[Tuple[str, Any, Tuple[int, ...]]] = (
            None if one is None or one[3] is None else (one[0], one[1], one[3])
        )

    def prepare(self, inputs: Inputs) -> Dict[str, np.ndarray]:
        """Map the caller's inputs onto the model's: one bare array for a one-input model, names checked, dtypes cast."""
        # Fast path, taken by every well-formed request: the caller's arrays already fit; no copies.
        # (onnxruntime copies a non-contiguous array itself, so contiguity needs no check here.)
        one = self._check_one
        if one is not None:
            name, dtype, rank, fixed = one
            if inputs.__class__ is dict:
                value = inputs.get(name) if len(inputs) == 1 else None
                feeds = inputs
            elif inputs.__class__ is self._ndarray:
                value = inputs
                feeds = None
            else:
                return self._prepare_checked(inputs)
            if (
                value.__class__ is self._ndarray
                and (value.dtype is dtype or value.dtype == dtype)
                and (
                    value.shape[1:] == fixed
                    if fixed is not None
                    else (not rank or value.ndim == rank) and self._dims_ok(name, value.shape)
                )
            ):
                return {name: value} if feeds is None else feeds
            return self._prepare_checked(inputs)
        if inputs.__class__ is dict and len(inputs) == len(self._checks):
            for name, dtype, rank, fixed in self._checks:
                value = inputs.get(name)
                if (
                    value.__class__ is not self._ndarray
                    or value.dtype != dtype
                    or (rank and value.ndim != rank)
                    or (fixed is not None and value.shape[1:] != fixed)
                    or (fixed is None and not self._dims_ok(name, value.shape))
                ):
                    break
            else:
                return inputs
        return self._prepare_checked(inputs)

    def _dims_ok(self, name: str, shape: Tuple[int, ...]) -> bool:
        spec = next(t for t in self.info.inputs if t.name == name)
        return all(want is None or got == want for got, want in zip(shape[1:], (spec.shape or ())[1:]))

    def _prepare_checked(self, inputs: Inputs) -> Dict[str, np.ndarray]:
        """The slow path: cast what can be cast, and name exactly what does not fit."""
        import numpy as np

        names = [t.name for t in self.info.inputs]
        if isinstance(inputs, np.ndarray):
            if len(names) != 1:
                raise InferError(
                    "bad-input",
                    f"the model takes {len(names)} inputs ({', '.join(names)}); pass them by name",
                )
            inputs = {names[0]: inputs}
        if not isinstance(inputs, Mapping):
            raise InferError("bad-input", "inputs must be an array or a mapping of input name to array")
        unknown = sorted(str(k) for k in set(inputs) - set(names))
        missing = [n for n in names if n not in inputs]
        if unknown or missing:
            raise InferError(
                "bad-input",
                f"inputs do not match the model: missing {missing or 'none'}, unknown {unknown or 'none'}; "
                f"it takes {names}",
            )
        feeds: Dict[str, np.ndarray] = {}
        for spec in self.info.inputs:
            value = inputs[spec.name]
            dtype = self.dtypes[spec.name]
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                try:
                    value = np.asarray(value, dtype=dtype)
                except (TypeError, ValueError, OverflowError) as exc:
                    raise InferError(
                        "bad-input", f"input {spec.name!r} is not a {dtype} array: {exc}"
                    ) from None
            expected = [d if d is not None else "?" for d in (spec.shape or ())]
            if spec.shape and value.ndim != len(spec.shape):
                raise InferError(
                    "bad-input",
                    f"input {spec.name!r} has shape {list(value.shape)}, the model expects rank "
                    f"{len(spec.shape)} {expected}",
                )
            if not self._dims_ok(spec.name, value.shape):
                raise InferError(
                    "bad-input",
                    f"input {spec.name!r} has shape {list(value.shape)}, the model expects {expected}",
                )
            feeds[spec.name] = value
        return feeds

    def run(self, feeds: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
        """Run prepared feeds; outputs by name."""
        return self.outputs_by_name(self.call(feeds))

    def outputs_by_name(self, values: Sequence[np.ndarray]) -> Dict[str, np.ndarray]:
        """The runtime's output list as a dict keyed by output name."""
        only = self._only_output
        if only is not None:
            return {only: values[0]}
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        """Close the runtime now (a candidate that never served); later calls raise `runtime-closed`."""
        self._finalizer()
        # The fast call may hold the engine's session itself; drop it so the memory goes now.
        self.call = self.runtime.run


__all__: List[str] = ["ActiveModel", "InferError", "InferResult", "LoadedModel"]
