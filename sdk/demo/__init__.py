"""`edgefleet demo`: the whole loop on this machine with nothing installed beyond edgefleet.

It starts an embedded MQTT broker (Mosquitto when on PATH, else amqtt in-process), the control plane
(SQLite store, ingest, REST API and dashboard, all in this process), and a fleet of emulated agent
processes; trains the digits CNN, builds it per device profile, rolls it out with a canary while local
traffic (held-out digits, with their true labels as feedback) runs through each device's `/v1/infer`,
and prints what the devices measured. `--bad-model` then ships a release with a class-mapping bug and
shows the canary's telemetry abort the rollout and roll the canary back.

Only one Python process per emulated device runs beside this one: the broker, server, ingest, rollout
engine and traffic generator share this process, because the machine this was made on has two cores.
"""

from __future__ import annotations

from edgefleet.sdk.demo.bundles import mislabeled_copy, restamp
from edgefleet.sdk.demo.options import (
    BAD_CLASSES,
    DEFAULT_DEVICES,
    DEFAULT_PORT,
    FLEET,
    MARKER,
    MODEL_NAME,
    BadOutcome,
    DemoError,
    DemoInterrupted,
    DemoOptions,
    DemoResult,
    DeviceRow,
    parse_devices,
)
from edgefleet.sdk.demo.runner import Demo, run_demo
from edgefleet.sdk.demo.session import prepare_state_dir
from edgefleet.sdk.demo.traffic import Traffic

__all__ = [
    "BAD_CLASSES",
    "DEFAULT_DEVICES",
    "DEFAULT_PORT",
    "FLEET",
    "MARKER",
    "MODEL_NAME",
    "BadOutcome",
    "Demo",
    "DemoError",
    "DemoInterrupted",
    "DemoOptions",
    "DemoResult",
    "DeviceRow",
    "Traffic",
    "mislabeled_copy",
    "parse_devices",
    "prepare_state_dir",
    "restamp",
    "run_demo",
]
