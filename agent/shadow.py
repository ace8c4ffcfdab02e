"""Shadow evaluation: after a switch, run the replaced model beside the new one on a sample of live requests.

The answer served always comes from the serving model; the request path only hands a sampled share
of requests (their inputs and the served result) to a bounded queue, dropping them when it is full,
so serving is never slowed or changed. One background worker runs the other model on them, with its
CPU use held to `cpu_share` of its wall time (it sleeps in proportion to each run), and keeps the
window's agreement: top-1 agreement for classifier outputs, the mean cosine (fidelity) of the outputs
otherwise, or the bundle's eval metric where the manifest names agreement or fidelity; for a task metric
(map50, token_error_rate, embedding_cosine) the replaced model's outputs are the reference. Telemetry
carries it as a `Quality` reading with source `shadow`, which the rollout's `--min-agreement` /
`--min-fidelity` gates read. The replaced model comes from the installer's other A/B slot and is
released when the shadow window ends, on a rollback, before the next install, or at stop.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from edgefleet.agent.core import quality_tasks as tasks
from edgefleet.agent.core.codes import QualitySource
from edgefleet.agent.core.quality import (
    AGREEMENT,
    ALL_METRICS,
    FIDELITY,
    TASK_METRIC_NAMES,
    Quality,
    agreement,
    row_cosines,
)

if TYPE_CHECKING:
    from edgefleet.agent.model import InferResult, LoadedModel

log = logging.getLogger(__name__)

# Requests waiting for the shadow model; more are dropped (never queued without bound).
QUEUE_MAX = 8
# Images whose detections a window keeps for its mAP (mAP is not a sum of per-request scores).
MAX_DETECTION_IMAGES = 1024


class TaskWindow:
    """The running sums of one task metric over a shadow window, the replaced model as reference."""

    def __init__(self, metric: str) -> None:
        self.metric = metric
        self.task = ALL_METRICS[metric].task
        self.found: List[Any] = []
        self.truth: List[Any] = []
        self.errors = 0
        self.tokens = 0
        self.cos_sum = 0.0
        self.cos_count = 0
        self.cos_min = 1.0

    def add(self, served: List[Any], shadow: List[Any]) -> None:
        """Add one request's outputs (the served model's against the replaced one's)."""
        if self.task == tasks.DETECTION:
            room = MAX_DETECTION_IMAGES - len(self.found)
            self.found.extend(tasks.detections(served)[:room])
            self.truth.extend(tasks.reference_truth(shadow)[:room])
        elif self.task == tasks.CTC:
            for hyp, ref in zip(tasks.greedy_decode(served[0]), tasks.greedy_decode(shadow[0])):
                self.errors += tasks.edit_distance(hyp, ref)
                self.tokens += len(ref)
        else:
            cos = tasks.embedding_cosines(served, reference=shadow)
            self.cos_sum += float(cos.sum())
            self.cos_count += int(cos.size)
            self.cos_min = min(self.cos_min, float(cos.min()) if cos.size else 1.0)

    def scores(self) -> Dict[str, float]:
        """The metric and its detail over the window (empty when nothing was scored)."""
        if self.task == tasks.DETECTION:
            if not self.found:
                return {}
            value, classes = tasks.mean_average_precision(self.found, self.truth)
            return {self.metric: value, "map50_classes": float(classes)}
        if self.task == tasks.CTC:
            return {self.metric: self.errors / self.tokens} if self.tokens else {}
        if not self.cos_count:
            return {}
        return {self.metric: self.cos_sum / self.cos_count, "embedding_cosine_min": self.cos_min}


class ShadowWindow:
    """Agreement counts since the last telemetry message (thread-safe); `metric` may name a task metric."""

    def __init__(self, metric: Optional[str] = None) -> None:
        self._lock = threading.Lock()
        self.task_metric = metric if metric in TASK_METRIC_NAMES else None
        self.task: Optional[TaskWindow] = TaskWindow(self.task_metric) if self.task_metric else None
        self.requests = 0
        self.rows = 0
        self.agreeing = 0
        self.classifier_rows = 0
        self.cosine_sum = 0.0
        self.cosine_min = 1.0

    def add(self, served: Any, shadow: Any) -> None:
        """Score one request: the served outputs against the shadow model's (lists of arrays, same order)."""
        cos = row_cosines(served, shadow)
        agree = agreement(served, shadow)
        n = int(cos.shape[0])
        with self._lock:
            if self.task is not None:
                try:
                    self.task.add(list(served), list(shadow))
                except tasks.TaskDataError as exc:  # outputs not in the task's format: no task reading
                    log.debug("shadow %s not scored: %s", self.task.metric, exc.reason)
            self.requests += 1
            self.rows += n
            self.cosine_sum += float(cos.sum())
            self.cosine_min = min(self.cosine_min, float(cos.min()) if n else 1.0)
            if agree is not None:
                self.classifier_rows += n
                self.agreeing += round(agree * n)

    def reading(self, metric: Optional[str], reset: bool = True) -> Optional[Quality]:
        """The window's reading (source `shadow`, samples = live requests compared), or None when empty."""
        with self._lock:
            if self.requests == 0 or self.rows == 0:
                return None
            fidelity = self.cosine_sum / self.rows
            scores = {FIDELITY: fidelity}
            if self.classifier_rows and self.task is None:
                scores[AGREEMENT] = self.agreeing / self.classifier_rows
            if self.task is not None:
                scores.update(self.task.scores())
            requests, worst = self.requests, self.cosine_min
            if reset:
                self.__init__(self.task_metric)  # type: ignore[misc]
        name = metric if metric in scores else (AGREEMENT if AGREEMENT in scores else FIDELITY)
        detail = {k: round(v, 6) for k, v in scores.items() if k != name}
        detail["fidelity_min"] = round(worst, 6)
        return Quality(
            metric=name,
            value=round(scores[name], 6),
            samples=requests,
            detail=detail,
            source=QualitySource.SHADOW.value,
        )


class Shadow:
    """One shadow window: the replaced model, the sampler on the request path and the bounded worker."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        share: float,
        cpu_share: float,
        duration_s: float,
        metric: Optional[str] = None,
        on_end: Optional[Callable[[], None]] = None,
    ) -> None:
        if not 0 < share <= 1 or not 0 < cpu_share <= 1:
            raise ValueError(f"shadow share {share} and CPU share {cpu_share} must be in (0, 1]")
        self.model = model
        self.share = float(share)
        self.cpu_share = float(cpu_share)
        self.metric = metric
        self.deadline = time.monotonic() + max(0.0, duration_s)
        self.window = ShadowWindow(metric)
        self.dropped = 0
        self._queue: queue.Queue[Tuple[Any, InferResult]] = queue.Queue(QUEUE_MAX)
        self._stop = threading.Event()
        self._on_end = on_end
        self._random = random.random
        self._thread = threading.Thread(target=self._work, name="shadow", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        """The shadowed model, `name vN`."""
        return f"{self.model.info.name} v{self.model.info.version}"

    def offer(self, inputs: Any, result: InferResult) -> None:
        """On the request path: hand a sampled share of answered requests to the worker; never blocks or raises."""
        if self._random() >= self.share or self._stop.is_set():
            return
        try:
            self._queue.put_nowait((inputs, result))
        except queue.Full:
            self.dropped += 1

    def reading(self, reset: bool = True) -> Optional[Quality]:
        """The agreement of the window since the last call, as a `shadow` quality reading."""
        return self.window.reading(self.metric, reset)

    def stop(self) -> None:
        """End the window: stop the worker and release the shadow model."""
        self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(5)
        self.model.close()

    def _work(self) -> None:
        try:
            while not self._stop.is_set() and time.monotonic() < self.deadline:
                try:
                    inputs, result = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                started = time.perf_counter()
                try:
                    self._compare(inputs, result)
                except Exception as exc:  # a shadow failure never touches serving
                    log.debug("shadow run failed: %s", exc)
                spent = time.perf_counter() - started
                # Hold the worker's CPU to `cpu_share` of its wall time: rest (1 - c) / c per second run.
                self._stop.wait(spent * (1.0 - self.cpu_share) / self.cpu_share)
        finally:
            if not self._stop.is_set() and self._on_end is not None:
                self._on_end()

    def _compare(self, inputs: Any, result: InferResult) -> None:
        model = self.model
        shadow = model.run(model.prepare(inputs))
        served = result.outputs
        names = [n for n in served if n in shadow]
        if not names:
            return
        got: List[Any] = [served[n] for n in names]
        ref: List[Any] = [shadow[n] for n in names]
        self.window.add(got, ref)


class ShadowRunner:
    """The agent's shadow windows: one starts after each switch that left a previous model, one at a time."""

    def __init__(self, share: float, cpu_share: float, duration_s: float) -> None:
        self.share = float(share)
        self.cpu_share = float(cpu_share)
        self.duration_s = float(duration_s)
        self._lock = threading.Lock()
        self._server: Any = None
        self._shadow: Optional[Shadow] = None
        # The last reading of a window that ended between two telemetry messages.
        self._left: Optional[Quality] = None

    @property
    def enabled(self) -> bool:
        """Whether shadow windows run at all (share, CPU share and duration above 0)."""
        return self.share > 0 and self.cpu_share > 0 and self.duration_s > 0

    @property
    def active(self) -> Optional[Shadow]:
        """The running window, or None."""
        return self._shadow

    def start(self, installer: Any, server: Any) -> bool:
        """After a switch: load the replaced model (the previous A/B slot) and shadow the new one with it."""
        self.stop()
        if not self.enabled or not hasattr(installer, "load_previous"):
            return False
        loaded = installer.load_previous()
        if loaded is None:
            return False
        model, manifest = loaded
        metric = manifest.eval.metric if getattr(manifest, "eval", None) is not None else None
        shadow = Shadow(
            model,
            share=self.share,
            cpu_share=self.cpu_share,
            duration_s=self.duration_s,
            metric=None if metric not in (AGREEMENT, FIDELITY, *TASK_METRIC_NAMES) else metric,
            on_end=self._ended,
        )
        with self._lock:
            self._shadow, self._server = shadow, server
        server.set_tap(shadow.offer)
        log.info("shadowing the new model with %s on %.0f %% of requests", shadow.name, 100 * self.share)
        return True

    def stop(self) -> None:
        """End the running window (rollback, next install, stop); its last reading goes out with telemetry."""
        with self._lock:
            shadow, server, self._shadow = self._shadow, self._server, None
        if shadow is None:
            return
        if server is not None:
            server.set_tap(None)
        self._left = shadow.reading() or self._left
        shadow.stop()

    def readings(self) -> Tuple[Quality, ...]:
        """The `shadow` quality readings for this telemetry window (empty when nothing was compared)."""
        left, self._left = self._left, None
        shadow = self._shadow
        current = shadow.reading() if shadow is not None else None
        # A window that ended in this telemetry interval and a new one both compared requests only
        # when a second switch came within one interval; the newer window is the one that counts.
        reading = current if current is not None else left
        return () if reading is None else (reading,)

    def _ended(self) -> None:
        """The window's time is up (called from its worker): release the replaced model."""
        self.stop()
