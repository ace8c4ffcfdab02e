"""Local traffic for the emulated devices: held-out digits to /v1/infer, their labels to /v1/feedback."""

from __future__ import annotations

import http.client
import json
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    pass


class Traffic:
    """Sends held-out digits to every device's /v1/infer and their true labels to /v1/feedback, on a thread.

    Refusals (no model installed yet, an agent restarting) are counted, never raised: the devices'
    own telemetry is what the demo reports, this only drives it.
    """

    def __init__(self, ports: dict[str, int], x: np.ndarray, y: np.ndarray, interval_s: float = 0.05) -> None:
        self.ports = ports
        self.x, self.y = x, y
        self.interval_s = interval_s
        self.ok = 0
        self.refused = 0
        self.served: dict[str, tuple[str, int]] = {}
        self._conns: dict[str, http.client.HTTPConnection] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)

    def start(self) -> Traffic:
        """Begin sending."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and close the connections."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        for conn in self._conns.values():
            conn.close()

    def _post(self, device: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = self._conns.get(device)
        if conn is None:
            # Keep-alive: one connection per device keeps the client's cost small on a shared CPU.
            conn = http.client.HTTPConnection("127.0.0.1", self.ports[device], timeout=5)
            self._conns[device] = conn
        data = json.dumps(body).encode()
        try:
            conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            self._conns.pop(device, None)
            raise
        if resp.status != 200:
            raise OSError(f"{path} answered {resp.status}")
        doc: dict[str, Any] = json.loads(payload)
        return doc

    def _run(self) -> None:
        index = 0
        while not self._stop.wait(self.interval_s):
            for offset, device in enumerate(self.ports):
                i = (index + 97 * offset) % len(self.x)
                try:
                    answer = self._post(device, "/v1/infer", {"inputs": self.x[i : i + 1].tolist()})
                    self._post(
                        device,
                        "/v1/feedback",
                        {"request_id": answer["request_id"], "label": int(self.y[i])},
                    )
                    self.served[device] = (str(answer.get("model")), int(answer.get("version") or 0))
                    self.ok += 1
                except (OSError, ValueError, KeyError, http.client.HTTPException):
                    self.refused += 1
            index += 1
