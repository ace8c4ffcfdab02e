"""The device's own training data: `--train-data DIR` (.npz files with `x` and `y`) and the feedback buffer.

With `keep_feedback = N` the agent remembers the inputs of recent requests in memory and, when an app
labels one (`/v1/feedback`, `Agent.feedback`), writes input and label into a ring of N files on disk.
Nothing here ever leaves the device: training reads these files and sends only the head's change.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, List, Mapping, Optional, Tuple

import numpy as np

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.federated_msgs import FedCode
from edgefleet.agent.core.fsutil import atomic_write_json

log = logging.getLogger("edgefleet.agent.federated")

FEEDBACK_DIR = "feedback"
# Inputs of requests not labelled yet, kept in memory (oldest dropped first).
PENDING_INPUTS = 1024
# One kept input may be at most this large (an image, not a video).
MAX_ROW_BYTES = 4 << 20


class DataError(AgentError):
    """The local training data cannot be read; `code` is `no-train-data`."""

    default_code = FedCode.NO_TRAIN_DATA


def _read_npz(path: Path, input_name: str) -> Tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(os.fspath(path), allow_pickle=False) as npz:
            key = "x" if "x" in npz.files else input_name
            if key not in npz.files or "y" not in npz.files:
                raise DataError(reason=f"{path} must hold arrays 'x' (or {input_name!r}) and 'y'")
            return np.asarray(npz[key]), np.asarray(npz["y"])
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(reason=f"{path} is not a readable .npz: {exc}") from None


def load_train_data(
    directory: Optional[str],
    input_name: str,
    feedback: Optional[FeedbackBuffer] = None,
    max_samples: int = 100_000,
) -> Tuple[np.ndarray, np.ndarray]:
    """Every local example: the .npz files of `directory` (sorted) then the feedback buffer; at most `max_samples`."""
    xs: List[np.ndarray] = []
    ys: List[np.ndarray] = []
    if directory:
        for path in sorted(Path(directory).glob("*.npz")):
            x, y = _read_npz(path, input_name)
            if len(x) != len(y):
                raise DataError(reason=f"{path}: {len(x)} rows of x but {len(y)} labels")
            xs.append(x)
            ys.append(y.reshape(-1))
    if feedback is not None:
        fx, fy = feedback.read()
        if len(fy):
            xs.append(fx)
            ys.append(fy)
    if not xs or sum(len(y) for y in ys) == 0:
        raise DataError(
            reason="this device has no training data: start the agent with --train-data DIR or keep_feedback = N"
        )
    shapes = {x.shape[1:] for x in xs}
    if len(shapes) != 1:
        raise DataError(reason=f"local data rows have different shapes {sorted(map(str, shapes))}")
    x_all, y_all = np.concatenate(xs)[:max_samples], np.concatenate(ys)[:max_samples]
    if y_all.dtype.kind not in "iu" or (y_all < 0).any():
        raise DataError(reason="labels 'y' must be class indexes >= 0")
    return x_all, y_all.astype(np.int64)


class FeedbackBuffer:
    """Labelled inputs on disk, at most `capacity` of them (a ring of files: the oldest is overwritten)."""

    def __init__(self, state_dir: Path, capacity: int) -> None:
        self.dir = Path(state_dir) / FEEDBACK_DIR
        self.capacity = int(capacity)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, Any] = OrderedDict()
        self._counter_file = self.dir / "next.json"
        try:
            self._next = int(json.loads(self._counter_file.read_text()).get("next", 0))
        except (OSError, ValueError, AttributeError):
            self._next = 0

    def remember(self, request_id: str, inputs: Mapping[str, Any]) -> None:
        """Keep the input of a request until it is labelled (single-input models only)."""
        if len(inputs) != 1:
            return
        value = np.asarray(next(iter(inputs.values())))
        if value.nbytes > MAX_ROW_BYTES or value.ndim == 0:
            return
        with self._lock:
            self._pending[request_id] = value.copy()
            while len(self._pending) > PENDING_INPUTS:
                self._pending.popitem(last=False)

    def label(self, request_id: str, label: int) -> bool:
        """Store the remembered input of `request_id` with its label; False when it was not remembered."""
        with self._lock:
            value = self._pending.pop(request_id, None)
            if value is None:
                return False
            slot = self._next % self.capacity
            self._next += 1
            row = value[0] if value.ndim > 1 and value.shape[0] == 1 else value
            tmp = self.dir / f".slot-{slot}.npz.tmp"
            with open(tmp, "wb") as fh:
                np.savez(fh, x=row, y=np.array(label, dtype=np.int64))
            os.replace(tmp, self.dir / f"slot-{slot}.npz")
            atomic_write_json(self._counter_file, {"next": self._next})
        return True

    def __len__(self) -> int:
        return min(self._next, self.capacity)

    def read(self) -> Tuple[np.ndarray, np.ndarray]:
        """All stored examples: (x rows, labels)."""
        rows: List[np.ndarray] = []
        labels: List[int] = []
        with self._lock:
            for path in sorted(self.dir.glob("slot-*.npz")):
                try:
                    with np.load(os.fspath(path), allow_pickle=False) as npz:
                        rows.append(np.asarray(npz["x"]))
                        labels.append(int(npz["y"]))
                except (OSError, ValueError, KeyError, EOFError) as exc:
                    log.warning("skipping unreadable feedback example %s: %s", path, exc)
        if not rows:
            return np.zeros((0,)), np.zeros((0,), dtype=np.int64)
        return np.stack(rows), np.asarray(labels, dtype=np.int64)


__all__ = ["DataError", "FeedbackBuffer", "load_train_data"]
