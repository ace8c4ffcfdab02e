"""onnxruntime plug-in: CPU everywhere, TensorRT and CUDA execution providers first where the build has them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Sequence, Tuple

from edgefleet.agent.core.errors import RuntimeLoadError
from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo, run_in_chunks

if TYPE_CHECKING:
    import numpy as np

# onnxruntime's type strings → numpy dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}
# Preference when the profile does not say: the fastest provider present wins, CPU is always last.
DEFAULT_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _shape(raw: Any) -> Tuple[Optional[int], ...]:
    return tuple(d if isinstance(d, int) and d >= 0 else None for d in (raw or ()))


def choose_providers(requested: Sequence[str], available: Sequence[str]) -> List[str]:
    """The requested providers this build has, in the requested order, always ending with CPU."""
    wanted = list(requested) or list(DEFAULT_ORDER)
    chosen = [p for p in wanted if p in available and p != "CPUExecutionProvider"]
    chosen.append("CPUExecutionProvider")
    return chosen


@RUNTIMES.register("onnxruntime")
class OnnxRuntime(Runtime):
    """An onnxruntime InferenceSession; `session.run` is thread-safe, so no lock is taken."""

    name = "onnxruntime"

    def __init__(self, model_path: Path, threads: int, providers: Optional[Sequence[str]] = None) -> None:
        super().__init__(model_path, threads, providers)
        try:
            import onnxruntime as ort
        except ImportError:
            raise RuntimeLoadError(
                "runtime-missing", "onnxruntime is not installed on this device: pip install onnxruntime"
            ) from None
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        # One request is one graph; parallel branches are rare in edge models, extra pools cost memory.
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        chosen = choose_providers(self.requested_providers, ort.get_available_providers())
        self._session: Any = ort.InferenceSession(
            str(self.model_path), sess_options=options, providers=chosen
        )
        self._inputs = [
            TensorInfo(i.name, _ORT_TYPES.get(i.type, "float32"), _shape(i.shape))
            for i in self._session.get_inputs()
        ]
        self._outputs = [
            TensorInfo(o.name, _ORT_TYPES.get(o.type, "float32"), _shape(o.shape))
            for o in self._session.get_outputs()
        ]
        self._output_names = [o.name for o in self._outputs]
        # A model exported with a static batch (torch.export at batch 1, say) takes exactly that many rows.
        first = self._inputs[0].shape if self._inputs else ()
        self._fixed_batch: Optional[int] = int(first[0]) if first and first[0] else None

    @property
    def fixed_batch(self) -> Optional[int]:
        """The batch size baked into the graph (other row counts run in chunks of it), or None."""
        return self._fixed_batch

    @property
    def inputs(self) -> List[TensorInfo]:
        """The session's inputs."""
        return list(self._inputs)

    @property
    def outputs(self) -> List[TensorInfo]:
        """The session's outputs."""
        return list(self._outputs)

    @property
    def providers(self) -> List[str]:
        """Providers the session actually got (onnxruntime drops those that fail to initialise)."""
        session = self._session
        return list(session.get_providers()) if session is not None else []

    def run(self, feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
        """One session.run over all outputs."""
        session = self._session
        if session is None:
            raise RuntimeLoadError("runtime-closed", f"{self.model_path.name} was unloaded")
        if self._fixed_batch is not None:
            return run_in_chunks(lambda part: session.run(self._output_names, part), feeds, self._fixed_batch)
        return session.run(self._output_names, feeds)

    def runner(self) -> Callable[[Mapping[str, np.ndarray]], List[np.ndarray]]:
        """The C-level run of the session, for feeds already checked against `inputs`.

        `InferenceSession.run` re-checks the feed's names in Python on every call (~2 µs, as much as
        the whole digits CNN's overhead budget); the model server has done those checks in `prepare`,
        so it calls the compiled `run` underneath with prebuilt output names. When an execution
        provider fails at run time, the call goes through `run` once, which keeps onnxruntime's own
        fallback to the remaining providers, and the new compiled session is used from then on.
        """
        session = self._session
        if session is None:
            raise RuntimeLoadError("runtime-closed", f"{self.model_path.name} was unloaded")
        compiled = getattr(session, "_sess", None)
        if compiled is None or not callable(getattr(compiled, "run", None)):
            return self.run  # an onnxruntime without the compiled session attribute: the public path
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

        ep_fail: Any = getattr(ort_c, "EPFail", RuntimeError)
        names = list(self._output_names)
        fast = compiled.run

        def run(feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
            nonlocal fast
            try:
                return fast(names, feeds, None)
            except ep_fail:
                outputs = self.run(feeds)  # onnxruntime falls back to the next providers here
                current = self._session
                if current is not None:
                    fast = current._sess.run
                return outputs

        batch = self._fixed_batch
        if batch is None:
            return run

        def run_fixed(feeds: Mapping[str, np.ndarray]) -> List[np.ndarray]:
            # The usual request matches the baked-in batch and takes the fast path; others run in chunks.
            if feeds and next(iter(feeds.values())).shape[0] == batch:
                return run(feeds)
            return run_in_chunks(run, feeds, batch)

        return run_fixed

    def close(self) -> None:
        """Drop the session (onnxruntime frees it when the last reference goes)."""
        self._session = None
