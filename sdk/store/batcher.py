"""A background writer that collects telemetry messages and stores them in batches."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from typing import Any

from edgefleet.sdk.store.schema import StoreError
from edgefleet.sdk.store.telemetry import TelemetryMixin


class TelemetryBatcher:
    """Collects telemetry messages and writes them in batches (by size or age) on a background thread."""

    def __init__(
        self, store: TelemetryMixin, fleet: str, max_rows: int = 500, max_delay_s: float = 0.5
    ) -> None:
        self.store = store
        self.fleet = fleet
        self.max_rows = max_rows
        self.max_delay_s = max_delay_s
        self._pending: list[Mapping[str, Any]] = []
        self._cond = threading.Condition()
        self._stop = False
        self.queued = 0
        self.written = 0
        self.failures = 0
        self._thread = threading.Thread(target=self._run, name="telemetry-batcher", daemon=True)
        self._thread.start()

    def add(self, message: Mapping[str, Any]) -> None:
        """Queue one message; it is written within `max_delay_s` or when the batch is full."""
        with self._cond:
            self._pending.append(message)
            self.queued += 1
            if len(self._pending) >= self.max_rows:
                self._cond.notify()

    def _take(self) -> list[Mapping[str, Any]]:
        with self._cond:
            if not self._pending and not self._stop:
                self._cond.wait(self.max_delay_s)
            batch, self._pending = self._pending, []
            return batch

    def _run(self) -> None:
        delay = 0.1
        while True:
            batch = self._take()
            while batch:
                try:
                    self.written += self.store.add_telemetry(self.fleet, batch)
                    batch = []
                    delay = 0.1
                except StoreError:
                    # Keep the batch and retry with backoff: a locked SQLite file or a restarting
                    # PostgreSQL must not lose telemetry.
                    self.failures += 1
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
                    if self._stop and self.failures > 20:
                        return
            with self._cond:
                if self._stop and not self._pending:
                    return

    def flush(self, timeout: float = 10.0) -> None:
        """Block until everything queued so far is written, or `timeout` passes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            target = self.queued
            self._cond.notify()
        while self.written < target and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self, timeout: float = 10.0) -> None:
        """Write what is left and stop the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout)
