"""Small helpers of the agent's wiring: the inbox, the Error-event flood limiter, JSON-safe values."""

from __future__ import annotations

import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple


class Inbox:
    """Messages from paho's thread to the worker, bounded in payload bytes (a full inbox back-pressures the broker)."""

    def __init__(self, limit_bytes: int, stop: threading.Event) -> None:
        self._queue: queue.Queue[Optional[Tuple[str, bytes, Any]]] = queue.Queue(maxsize=10000)
        self._bytes = 0
        self._limit = limit_bytes
        self._space = threading.Condition()
        self._stop = stop

    def put(self, topic: str, payload: bytes, ack: Any = None) -> None:
        """Queue one message (and its PUBACK, if any); waits while the inbox is full (dropped once the agent stops)."""
        with self._space:
            # One message always fits, so a payload larger than the limit cannot wedge the queue.
            while self._bytes and self._bytes + len(payload) > self._limit:
                if self._stop.is_set():
                    return
                self._space.wait(0.5)
            self._bytes += len(payload)
        self._queue.put((topic, payload, ack))

    def get(self) -> Optional[Tuple[str, bytes, Any]]:
        """The next message, or None once closed."""
        item = self._queue.get()
        if item is not None:
            with self._space:
                self._bytes -= len(item[1])
                self._space.notify()
        return item

    def close(self) -> None:
        """Wake the worker so it sees the stop."""
        self._queue.put(None)


class ErrorLimiter:
    """Token bucket for Error events, so a flood of bad input cannot turn into a flood of events."""

    def __init__(self, rate: float = 20.0, burst: float = 50.0) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = time.monotonic()
        self.suppressed = 0

    def allow(self) -> bool:
        """Whether one more event may go out now (else it is counted as suppressed)."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        self.suppressed += 1
        return False


def result_dict(result: Any) -> Dict[str, Any]:
    """An InstallResult (dataclass or mapping) as a plain dict."""
    if result is None:
        return {}
    if isinstance(result, Mapping):
        return dict(result)
    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    import dataclasses

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    return {"result": str(result)}


def jsonable(value: Any) -> Any:
    """Make a value JSON-safe (numpy scalars, paths, tuples, NaN → None)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return jsonable(value.item())
    return str(value)
