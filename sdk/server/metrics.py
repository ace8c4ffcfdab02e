"""Prometheus text exposition (format 0.0.4) of the fleet: per device and model version, and rollouts.

Written by hand rather than with prometheus-client: the values are read from the store on each scrape
(no in-process counters to keep), and the format is a few lines of escaping.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Optional

from edgefleet.agent.core.quality import METRIC_NAMES
from edgefleet.sdk.server import queries
from edgefleet.sdk.store import Store

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def escape_label(value: Any) -> str:
    """Escape a label value: backslash, double quote and newline, as the format requires."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value; NaN and infinities use the spellings Prometheus parses."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


class Exposition:
    """Collects metric families and renders them, each with its HELP and TYPE lines once."""

    def __init__(self) -> None:
        self._families: dict[str, tuple[str, str, list[str]]] = {}

    def add(
        self, name: str, kind: str, help_text: str, labels: Mapping[str, Any], value: Optional[float]
    ) -> None:
        """Add one sample (skipped when the value is unknown)."""
        family = self._families.setdefault(name, (kind, help_text, []))
        if value is None:
            return
        label_text = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items())
        family[2].append(
            f"{name}{{{label_text}}} {format_value(float(value))}"
            if labels
            else f"{name} {format_value(float(value))}"
        )

    def render(self) -> str:
        """The exposition text."""
        lines: list[str] = []
        for name, (kind, help_text, samples) in self._families.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} {kind}")
            lines.extend(samples)
        return "\n".join(lines) + "\n"


def _ms_to_s(value: Optional[float]) -> Optional[float]:
    return None if value is None else value / 1000.0


def collect(store: Store, fleet: str, actions_enabled: bool) -> str:
    """Read the store and render every metric of one fleet."""
    out = Exposition()
    devices = store.devices(fleet)
    gap_totals = queries.gap_totals(store, fleet)
    out.add("edgefleet_up", "gauge", "1 while the edgefleet API serves.", {"fleet": fleet}, 1)
    out.add(
        "edgefleet_actions_enabled",
        "gauge",
        "1 when the server is attached to the broker and can deploy and abort.",
        {"fleet": fleet},
        1 if actions_enabled else 0,
    )
    for dev in devices:
        base = {"fleet": fleet, "device": dev["device_id"], "profile": dev["profile"] or ""}
        out.add(
            "edgefleet_device_online",
            "gauge",
            "1 when the device's last state says online.",
            base,
            1 if dev["online"] else 0,
        )
        out.add(
            "edgefleet_device_info",
            "gauge",
            "Constant 1; labels carry the device's agent version and active model.",
            {
                **base,
                "agent_version": dev["agent_version"] or "",
                "model": dev["active_model"] or "",
                "version": "" if dev["active_version"] is None else dev["active_version"],
            },
            1,
        )
        out.add(
            "edgefleet_device_desired_differs",
            "gauge",
            "1 when the device runs another model version than the one it should run.",
            base,
            1 if _differs(dev) else 0,
        )
        out.add(
            "edgefleet_device_last_seen_timestamp_seconds",
            "gauge",
            "Unix time of the device's last message.",
            base,
            dev["last_seen"],
        )
        out.add(
            "edgefleet_telemetry_missing_messages_total",
            "counter",
            "Messages the device sent (by sequence number) that never reached the store.",
            base,
            gap_totals.get(dev["device_id"], 0),
        )
    for row in queries.latest_per_device_version(store, fleet):
        labels = {
            "fleet": fleet,
            "device": row["device_id"],
            "profile": row["profile"] or "",
            "model": row["model_name"] or "",
            "version": "" if row["model_version"] is None else row["model_version"],
        }
        for quantile, column in (("0.5", "p50_ms"), ("0.95", "p95_ms"), ("0.99", "p99_ms")):
            out.add(
                "edgefleet_inference_latency_seconds",
                "gauge",
                "Inference latency quantile over the device's latest telemetry window.",
                {**labels, "quantile": quantile},
                _ms_to_s(row[column]),
            )
        out.add(
            "edgefleet_inferences_total",
            "counter",
            "Inferences reported in the stored telemetry.",
            labels,
            int(row["total_count"] or 0),
        )
        out.add(
            "edgefleet_inference_errors_total",
            "counter",
            "Failed inferences reported in the stored telemetry.",
            labels,
            int(row["total_errors"] or 0),
        )
        for kind, column in (("eval", "accuracy"), ("live", "live_accuracy")):
            out.add(
                "edgefleet_model_accuracy",
                "gauge",
                "Accuracy in the latest telemetry window: on the bundle's eval data, or on labelled live traffic.",
                {**labels, "kind": kind},
                row[column],
            )
        for name in METRIC_NAMES:
            out.add(
                "edgefleet_model_quality",
                "gauge",
                "Quality on the bundle's eval data in the latest telemetry window, by metric "
                "(accuracy: labels; agreement, fidelity: reference outputs).",
                {**labels, "metric": name},
                row.get(name),
            )
        out.add(
            "edgefleet_telemetry_last_timestamp_seconds",
            "gauge",
            "Unix time of the latest telemetry window.",
            labels,
            row["ts"],
        )
    _rollout_metrics(out, queries.rollouts_with_devices(store, fleet, limit=20), fleet)
    from edgefleet.sdk.server.routes_federated import add_metrics

    add_metrics(out, store, fleet)
    return out.render()


def _differs(dev: Mapping[str, Any]) -> bool:
    """Whether a device's desired model is set and is not what it reports running."""
    if dev.get("desired_model") is None and dev.get("desired_version") is None:
        return False
    return (dev.get("desired_model"), dev.get("desired_version")) != (
        dev.get("active_model"),
        dev.get("active_version"),
    )


def _rollout_metrics(out: Exposition, rollouts: Sequence[Mapping[str, Any]], fleet: str) -> None:
    """Per rollout: its state as a 1-valued sample, and device counts per status."""
    for ro in rollouts:
        labels = {"fleet": fleet, "rollout": ro["id"]}
        out.add(
            "edgefleet_rollout_state",
            "gauge",
            "1 for the rollout's current state (the 20 newest rollouts).",
            {**labels, "state": ro["status"]},
            1,
        )
        out.add(
            "edgefleet_rollout_progress_ratio",
            "gauge",
            "Share of the rollout's devices that are finished with it.",
            labels,
            ro["progress"]["fraction"],
        )
        for status, count in ro["progress"]["by_status"].items():
            out.add(
                "edgefleet_rollout_devices",
                "gauge",
                "Devices of the rollout in each status.",
                {**labels, "status": status},
                count,
            )
