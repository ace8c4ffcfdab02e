"""The model server: serves the active model, swaps in a new one atomically, keeps serving statistics.

Each active model has its own request path, a closure built once by `activate` that holds the model
(see `_serving`); the server's `infer` is that closure, replaced in one attribute store. A request
reads it once and holds it until it ends, so requests already running finish on the old session
while new ones go to the new. Those references are the in-flight count: CPython frees an object the
moment its last reference goes, and a finalizer then closes the old session, so it is closed exactly
when its last request is done and no counter or lock sits on the request path.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
    Union,
)

from edgefleet.agent.core.runtimes.base import load_runtime
from edgefleet.agent.model import ActiveModel, InferError, InferResult, LoadedModel, _no_model
from edgefleet.agent.telemetry import LatencyHistogram

if TYPE_CHECKING:
    import numpy as np

    Inputs = Union[Mapping[str, np.ndarray], np.ndarray]

# Predictions remembered for feedback; older ones are forgotten (feedback arrives within seconds).
FEEDBACK_CAPACITY = 4096
# Only small outputs (class scores) are kept for feedback, never embeddings.
FEEDBACK_MAX_ELEMENTS = 4096
# A prediction kept for feedback: the first output's bytes, dtype, and its shape, or (for an output
# declared with a fixed shape but for the batch) the number of elements in one row.
_Kept = Tuple[bytes, Any, Union[int, Tuple[int, ...]]]
# Latencies are counted into the histogram in batches of this many (and whenever stats are read).
_FOLD_AT = 256


class _Window:
    """Serving statistics since the last telemetry message."""

    def __init__(self) -> None:
        self.hist = LatencyHistogram()
        self.errors: Dict[str, int] = {}
        self.feedback = 0
        self.correct = 0
        self.started = time.time()


class _Books:
    """What the request path writes: latencies, error counts, predictions kept for feedback.

    Shared by the server and the request path of each model it serves; it references neither, so a
    model that stops serving is freed (and its session closed) as soon as its last request ends.
    """

    def __init__(self, capacity: int) -> None:
        self.lock = threading.Lock()
        self.window = _Window()
        # Totals of the windows already reported; the open window's counts are added when read.
        self.totals = {"count": 0, "errors": 0}
        self.capacity = capacity
        # Predictions kept for feedback: the last N under server-made ids (a ring indexed by id % N)
        # and the last N under the callers' own ids.
        self.ring: List[Optional[Tuple[int, bytes, Any, Union[int, Tuple[int, ...]]]]] = [None] * capacity
        self.named: OrderedDict[str, _Kept] = OrderedDict()
        # Latencies of requests not yet counted in the window's histogram (see fold).
        self.pending: List[float] = []
        self.ids = itertools.count(1)
        self.prefix = f"{os.getpid():x}-{int(time.time()):x}"

    def fold(self) -> None:
        """Move the waiting latencies into the open window's histogram."""
        with self.lock:
            pending = self.pending
            n = len(pending)
            if n:
                # Copy then delete the first n in place: appends racing with this land after them.
                batch = pending[:n]
                del pending[:n]
                self.window.hist.record_many(batch)

    def count_error(self, code: str) -> None:
        """Count one failed request in the open window."""
        with self.lock:
            self.window.errors[code] = self.window.errors.get(code, 0) + 1

    def keep_named(self, request_id: str, first: np.ndarray) -> None:
        """Keep a prediction under the caller's own id (HTTP, MQTT: a lock is noise there)."""
        with self.lock:
            named = self.named
            named[request_id] = (first.tobytes(), first.dtype, first.shape)
            if len(named) > self.capacity:
                named.popitem(last=False)


def _serving(books: _Books, model: LoadedModel) -> Callable[[Inputs, Optional[str]], InferResult]:
    """The request path of one model: everything it reads is bound here once, not looked up per request.

    Every line of `serve` is paid per request, on models that run in tens of µs (docs/agent-core.md):
    the inputs are checked inline when they already fit (prepare() does everything else), the runtime
    is called through its cheapest entry point, and the bookkeeping takes no lock: list.append,
    list item stores and next() on a counter are single C calls, atomic under the GIL. Latencies wait
    in a short list and go into the histogram in batches (C-level loops), a fraction of the cost of
    one locked record() per request.
    """
    call, prepare, info, ndarray = model.call, model.prepare, model.info, model._ndarray
    fit = model.fit
    name, dtype, tail = fit if fit is not None else ("", None, ())
    pending, ring, capacity, ids, prefix = books.pending, books.ring, books.capacity, books.ids, books.prefix
    fold, count_error, keep_named = books.fold, books.count_error, books.keep_named
    clock = time.perf_counter
    # Elements in one row of the first output when its declared shape is fixed but for the batch:
    # kept in place of the output's shape, which saves a tuple per request (see feedback()).
    row: Optional[int] = None
    declared = info.outputs[0].shape if info.outputs else ()
    if len(declared) >= 2 and all(isinstance(d, int) for d in declared[1:]):
        row = math.prod(declared[1:])  # type: ignore[arg-type]

    def serve(inputs: Inputs, request_id: Optional[str] = None) -> InferResult:
        start = clock()
        try:
            if fit is not None and inputs.__class__ is dict and len(inputs) == 1:
                # prepare()'s fast path, inline: the caller's array already fits, no copy is made.
                value = inputs.get(name)
                if (
                    value.__class__ is ndarray
                    and (value.dtype is dtype or value.dtype == dtype)
                    and value.shape[1:] == tail
                ):
                    feeds = inputs
                else:
                    feeds = prepare(inputs)
            else:
                feeds = prepare(inputs)
            values = call(feeds)
        except InferError as exc:
            count_error(exc.code)
            raise
        except Exception as exc:
            count_error("infer-failed")
            # engine errors (shape mismatch at run time, …) become one type
            raise InferError("infer-failed", f"{type(exc).__name__}: {exc}") from None
        latency = (clock() - start) * 1000.0
        pending.append(latency)
        if len(pending) >= _FOLD_AT:
            fold()
        first = values[0] if values else None
        # Small outputs (class scores) are kept for feedback as bytes, dtype and row size (or shape): the argmax is
        # paid only when feedback arrives, and no engine-owned buffer stays held (4096 onnxruntime
        # outputs kept alive made every later run's allocation slower).
        keep = first.__class__ is ndarray and first.size <= FEEDBACK_MAX_ELEMENTS
        if request_id is None:
            # Server-made ids are consecutive, so the last N predictions sit in a ring at id % N: one
            # list store, no dict, no eviction. The id stays (prefix, number) until someone reads it.
            n = next(ids)
            if keep:
                layout = row if row is not None else first.shape  # type: ignore[union-attr]
                ring[n % capacity] = (n, first.tobytes(), first.dtype, layout)  # type: ignore[union-attr]
            return InferResult(values, (prefix, n), info, latency)
        if keep:
            keep_named(request_id, first)  # type: ignore[arg-type]
        return InferResult(values, request_id, info, latency)

    return serve


def _not_serving(books: _Books) -> Callable[[Inputs, Optional[str]], InferResult]:
    """The request path while no model serves: count the failure, raise `no-model`."""

    def serve(inputs: Inputs, request_id: Optional[str] = None) -> InferResult:
        books.count_error("no-model")
        raise _no_model()

    return serve


def _tapped(
    serve: Callable[[Inputs, Optional[str]], InferResult], tap: Callable[[Inputs, InferResult], None]
) -> Callable[[Inputs, Optional[str]], InferResult]:
    """`serve`, then `tap(inputs, result)` on success; the answer is `serve`'s, whatever the tap does."""

    def serve_and_tap(inputs: Inputs, request_id: Optional[str] = None) -> InferResult:
        result = serve(inputs, request_id)
        try:
            tap(inputs, result)
        except Exception:
            pass  # a shadow failure must never fail a served request
        return result

    return serve_and_tap


class ModelServer:
    """Serves inferences on the active model; `load` + `activate` switch models with no failed request."""

    def __init__(
        self,
        threads: int,
        providers: Optional[Sequence[str]] = None,
        feedback_capacity: int = FEEDBACK_CAPACITY,
    ) -> None:
        self.threads = max(1, int(threads))
        self.providers = list(providers) if providers else None
        self._current: Optional[LoadedModel] = None
        self._lock = threading.Lock()
        self._feedback_capacity = max(1, int(feedback_capacity))
        self._books = _Books(self._feedback_capacity)
        self._serve: Callable[[Inputs, Optional[str]], InferResult]
        self._tap: Optional[Callable[[Inputs, InferResult], None]] = None
        self._untapped: Callable[[Inputs, Optional[str]], InferResult]
        self._route(_not_serving(self._books))

    # -- models ----------------------------------------------------------------------------------------

    def load(
        self,
        model_path: Path,
        *,
        name: str,
        version: int,
        slot: str,
        runtime: str = "onnxruntime",
        threads: Optional[int] = None,
    ) -> LoadedModel:
        """Load a model in a second runtime session beside the serving one (nothing changes for requests).

        `threads`: inference threads of this session (default the server's; the shadow model takes 1).
        """
        import numpy as np

        session = load_runtime(runtime, Path(model_path), threads or self.threads, self.providers)
        info = ActiveModel(
            name=name,
            version=int(version),
            slot=slot,
            runtime=runtime,
            providers=tuple(session.providers),
            inputs=tuple(session.inputs),
            outputs=tuple(session.outputs),
            path=str(model_path),
            loaded_at=time.time(),
        )
        dtypes = {t.name: np.dtype(t.dtype) for t in info.inputs}
        return LoadedModel(info=info, runtime=session, dtypes=dtypes)

    def activate(self, model: LoadedModel) -> Optional[ActiveModel]:
        """Make `model` serve new requests; the previous one closes when its in-flight requests end."""
        serve = _serving(self._books, model)
        with self._lock:
            old, self._current = self._current, model
            self._route(serve)
        return None if old is None else old.info

    def unload(self) -> Optional[ActiveModel]:
        """Stop serving anything (requests then fail with `no-model`)."""
        with self._lock:
            old, self._current = self._current, None
            self._route(_not_serving(self._books))
        return None if old is None else old.info

    def discard(self, model: LoadedModel) -> None:
        """Close a loaded model that never served (a candidate that failed its health check)."""
        if model is not self._current:
            model.close()

    @property
    def active(self) -> Optional[ActiveModel]:
        """The serving model, or None."""
        current = self._current
        return None if current is None else current.info

    @property
    def current(self) -> Optional[LoadedModel]:
        """The serving LoadedModel (for evaluations run by the installer)."""
        return self._current

    # -- requests --------------------------------------------------------------------------------------

    def _acquire(self) -> LoadedModel:
        # Reading one attribute is atomic; the local reference keeps this model open for the request.
        model = self._current
        if model is None:
            raise _no_model()
        return model

    def _route(self, serve: Callable[[Inputs, Optional[str]], InferResult]) -> None:
        """Make `serve` the instance's `infer` (one attribute store, atomic).

        A call then goes straight into the model's request path: a delegating method would add a
        Python frame, ~0.3 µs, 1.5 % of the digits CNN's run. A request reads the attribute once and
        finishes on the model it got, whatever `activate` stores meanwhile.
        """
        self._untapped = serve
        tap = self._tap
        if tap is not None:
            serve = _tapped(serve, tap)
        self._serve = serve
        setattr(self, "infer", serve)  # noqa: B010 - an instance attribute in front of the method

    def set_tap(self, tap: Optional[Callable[[Inputs, InferResult], None]]) -> None:
        """Hand every answered request to `tap` too (shadow evaluation, agent/shadow.py); None removes it.

        Without a tap the request path is exactly the model's closure (nothing added per request).
        """
        with self._lock:
            self._tap = tap
            self._route(self._untapped)

    def infer(self, inputs: Inputs, request_id: Optional[str] = None) -> InferResult:
        """Run one inference on the active model; raises InferError('no-model' | 'bad-input' | 'infer-failed').

        Calls reach the active model's request path directly (see `_route`); this method is what
        the class itself offers, with the same behaviour.
        """
        return self._serve(inputs, request_id)

    def feedback(self, request_id: str, label: int) -> None:
        """Record the true label of an earlier prediction; feeds live accuracy. Unknown ids raise InferError."""
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise InferError("bad-feedback", f"label must be a class index >= 0, got {label!r}")
        books = self._books
        kept: Optional[_Kept] = None
        prefix, _, number = request_id.rpartition("-")
        with books.lock:
            if prefix == books.prefix and number.isdigit():
                slot = int(number) % books.capacity
                entry = books.ring[slot]
                if entry is not None and entry[0] == int(number):
                    kept = entry[1:]
                    if books.ring[slot] is entry:  # one feedback per prediction
                        books.ring[slot] = None
            else:
                kept = books.named.pop(request_id, None)
        if kept is None:
            raise InferError(
                "unknown-request",
                f"no recent prediction has request id {request_id!r} (only the last "
                f"{books.capacity} classifier predictions are kept)",
            )
        import numpy as np

        data, dtype, layout = kept
        scores = np.frombuffer(data, dtype=dtype)
        # One row: exactly one row's elements when the layout is a row size (a batch, or an output
        # that broke its declared shape, is refused like a batch), else a shape of rank <= 1 or (1, …).
        single = scores.size == layout if isinstance(layout, int) else len(layout) <= 1 or layout[0] == 1
        predicted = int(scores.argmax()) if single and scores.size else None
        if predicted is None:
            raise InferError("bad-feedback", "feedback takes one label per request; send batches row by row")
        with books.lock:
            books.window.feedback += 1
            books.window.correct += int(predicted == label)

    def window_stats(self, reset: bool = True) -> Dict[str, Any]:
        """Requests, errors, latency p50/p95/p99/mean and live accuracy since the last call (reset by default)."""
        books = self._books
        books.fold()
        with books.lock:
            window = books.window
            totals = dict(books.totals)
            totals["count"] += window.hist.count
            totals["errors"] += sum(window.errors.values())
            if reset:
                books.window = _Window()
                books.totals = totals
        summary = window.hist.summary()
        elapsed = max(1e-9, time.time() - window.started)
        errors = sum(window.errors.values())
        return {
            "count": summary["count"],
            "errors": errors,
            "errors_by_code": dict(window.errors),
            "rate_per_s": round(float(summary["count"] or 0) / elapsed, 2),
            "latency_ms": {k: v for k, v in summary.items() if k != "count"},
            "p50_ms": summary["p50_ms"],
            "p95_ms": summary["p95_ms"],
            "p99_ms": summary["p99_ms"],
            "mean_ms": summary["mean_ms"],
            "feedback": window.feedback,
            "live_accuracy": round(window.correct / window.feedback, 4) if window.feedback else None,
            "total_count": totals["count"],
            "total_errors": totals["errors"],
            "window_s": round(elapsed, 3),
        }

    def status(self) -> Dict[str, Any]:
        """The serving model, for the local API when it fronts a bare server."""
        active = self.active
        return {"active": None if active is None else active.to_dict()}

    @contextmanager
    def hold(self) -> Iterator[LoadedModel]:
        """The serving model, kept open for the duration of the block even if a switch happens meanwhile."""
        model = self._acquire()
        yield model

    def run_on(self, model: LoadedModel, inputs: Inputs) -> Dict[str, np.ndarray]:
        """Run a model that may not be serving (health checks); not counted in serving statistics."""
        return model.run(model.prepare(inputs))


__all__: List[str] = ["ActiveModel", "InferError", "InferResult", "LoadedModel", "ModelServer"]
