"""Rollout strategies (`all`, `canary:PCT`, `waves:P1,P2,...`), wave planning and abort rules.

Abort rules follow AWS IoT Jobs: a share of rejected / timed-out devices counts only once a minimum
number of devices has finished, so one early failure in a big wave does not stop everything. They also
read the devices' telemetry: a quality metric (accuracy, agreement, fidelity) below its floor, or p95
latency above its maximum, on the devices already updated aborts the rollout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from edgefleet.agent.core.codes import FAILED_DEVICE, DeviceStatus, QualitySource
from edgefleet.agent.core.events import Telemetry
from edgefleet.agent.core.manifest import HealthPolicy
from edgefleet.agent.core.quality import (
    ACCURACY,
    ALL_METRIC_NAMES,
    ALL_METRICS,
    METRICS,
    canonical_metric,
    passes,
)
from edgefleet.sdk.fleet.errors import StrategyError

# Defaults of the telemetry rules: windows and live requests needed before a rule may abort (issue 14:
# one 3-request window on a busy host must not stop a healthy release).
MIN_WINDOWS = 3
MIN_REQUESTS = 50


@dataclass(frozen=True)
class Strategy:
    """Cumulative percentages of the selection reached after each wave; the last one is 100."""

    text: str
    waves: tuple[float, ...]

    def plan(self, device_ids: Sequence[str]) -> list[list[str]]:
        """Cut the devices (in the given order) into waves; every wave holds at least one device."""
        n = len(device_ids)
        out: list[list[str]] = []
        done = 0
        for pct in self.waves:
            upto = min(n, max(done + 1, math.ceil(n * pct / 100.0 - 1e-9)))
            if upto > done:
                out.append(list(device_ids[done:upto]))
                done = upto
        return out


def _percent(text: str, raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise StrategyError(f"strategy {text!r}: {raw!r} is not a percentage") from None
    if not 0 < value <= 100:
        raise StrategyError(f"strategy {text!r}: percentages must be in (0, 100], got {raw}")
    return value


def parse_strategy(text: str) -> Strategy:
    """Parse `all`, `canary:PCT` or `waves:P1,P2,...` (ascending, ending at 100)."""
    text = (text or "").strip()
    if text == "all":
        return Strategy(text, (100.0,))
    kind, _, rest = text.partition(":")
    if kind == "canary" and rest:
        pct = _percent(text, rest)
        return Strategy(text, (pct, 100.0) if pct < 100 else (100.0,))
    if kind == "waves" and rest:
        waves = tuple(_percent(text, p) for p in rest.split(","))
        if any(b <= a for a, b in zip(waves, waves[1:])):
            raise StrategyError(f"strategy {text!r}: wave percentages must grow, e.g. waves:10,50,100")
        if waves[-1] != 100:
            raise StrategyError(
                f"strategy {text!r}: the last wave must reach 100 (the whole selection), e.g. waves:10,50,100"
            )
        return Strategy(text, waves)
    raise StrategyError(f"unknown strategy {text!r}; use all, canary:PCT (e.g. canary:10) or waves:10,50,100")


@dataclass(frozen=True)
class TelemetrySample:
    """One telemetry window of an updated device (new model only), as the abort rules read it.

    `quality` maps a metric of the vocabulary (accuracy, agreement, fidelity) to the window's eval-set
    value; `live_accuracy` is the share of feedback labels the model got right.
    """

    device_id: str
    count: int = 0
    p95_ms: float | None = None
    quality: Mapping[str, float] = field(default_factory=dict)
    live_accuracy: float | None = None
    # Live agreement of the new model with the one it replaced (shadow evaluation): metric → value, and
    # how many live requests the window compared.
    shadow: Mapping[str, float] = field(default_factory=dict)
    shadow_samples: int = 0

    @classmethod
    def of(cls, message: Telemetry) -> TelemetrySample:
        """The sample in one telemetry message: its requests, p95 and quality readings."""
        quality: dict[str, float] = {}
        for reading in message.quality:
            if reading.source == QualitySource.EVAL:
                # A reading carries its own metric and may carry the others of its eval in `detail`.
                for name in ALL_METRIC_NAMES:
                    value = reading.get(name)
                    if value is not None:
                        quality.setdefault(name, value)
        shadow: dict[str, float] = {}
        shadow_samples = 0
        for reading in message.quality:
            if reading.source == QualitySource.SHADOW and reading.samples > 0:
                shadow_samples = max(shadow_samples, int(reading.samples))
                for name in ALL_METRIC_NAMES:
                    value = reading.get(name)
                    if value is not None:
                        shadow.setdefault(name, value)
        live = message.quality_of(ACCURACY, QualitySource.FEEDBACK)
        return cls(
            device_id=message.device,
            count=message.requests.count,
            p95_ms=message.latency.p95_ms,
            quality=quality,
            live_accuracy=None if live is None else live.value,
            shadow=shadow,
            shadow_samples=shadow_samples,
        )


@dataclass(frozen=True)
class AbortRules:
    """When a rollout stops by itself.

    `max_failed_pct`: abort when the share of rejected / timed-out devices among those finished exceeds
    it, once at least `min_finished` devices have finished. `telemetry`: also abort on the updated
    devices' telemetry (a quality metric below its floor `min_accuracy` / `min_agreement` /
    `min_fidelity`, p95 above `max_p95_ms`; each defaults to the manifest's health policy), once
    `min_samples` telemetry windows came in and, for rules on live traffic (latency, shadow agreement),
    `min_requests` requests. Latency is judged per device against its own bundle's budget; a noisy
    3-request window never aborts a rollout by itself (defaults: 3 windows, 50 requests).
    """

    max_failed_pct: float = 0.0
    min_finished: int = 1
    telemetry: bool = True
    min_samples: int = MIN_WINDOWS
    min_requests: int = MIN_REQUESTS
    max_p95_ms: float | None = None
    min_accuracy: float | None = None
    min_agreement: float | None = None
    min_fidelity: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_failed_pct < 100:
            raise StrategyError(f"max failed share {self.max_failed_pct} must be in [0, 100) percent")
        if self.min_finished < 1 or self.min_samples < 1 or self.min_requests < 1:
            raise StrategyError("the minimum counts of an abort rule must be at least 1")
        if self.max_p95_ms is not None and self.max_p95_ms <= 0:
            raise StrategyError(f"max p95 {self.max_p95_ms} ms must be above 0")
        for name, floor in self.floors().items():
            if not 0 <= floor <= 1:
                raise StrategyError(
                    f"{METRICS[name].flag} {floor} must be in [0, 1] (a share of rows, or a mean cosine)"
                )

    def floors(self) -> dict[str, float]:
        """The floors this rule sets itself, by metric (the manifest's fills the others)."""
        out = {}
        for name, m in METRICS.items():
            value = getattr(self, m.gate)
            if value is not None:
                out[name] = float(value)
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON for the store."""
        out = asdict(self)
        out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> AbortRules:
        """Inverse of `to_dict`."""
        known = {k: obj[k] for k in cls.__dataclass_fields__ if k in obj}
        return cls(**known)

    def check_outcomes(self, statuses: Mapping[str, str]) -> str | None:
        """The abort reason from per-device statuses, or None."""
        finished = [s for s in statuses.values() if s in FAILED_DEVICE or s == DeviceStatus.DEPLOYED]
        failed = [str(s) for s in finished if s in FAILED_DEVICE]
        if len(finished) < self.min_finished or not failed:
            return None
        share = 100.0 * len(failed) / len(finished)
        if share > self.max_failed_pct:
            kinds = ", ".join(f"{failed.count(k)} {k}" for k in sorted(set(failed)))
            return (
                f"{len(failed)} of {len(finished)} finished devices failed ({kinds}): {share:.0f}% is over "
                f"the {self.max_failed_pct:g}% abort threshold"
            )
        return None

    def check_telemetry(
        self, samples: Sequence[TelemetrySample], health: HealthPolicy | None, eval_metric: str | None = None
    ) -> str | None:
        """The abort reason from telemetry windows of updated devices (new model only), or None.

        `health` is the bundle's policy: its `max_p95_ms`, and its `min_quality` as the floor of its metric
        (`eval_metric`, the bundle's eval metric, when the policy names none) unless a rule sets that floor.
        """
        if not self.telemetry:
            return None
        max_p95 = self.max_p95_ms if self.max_p95_ms is not None else (health.max_p95_ms if health else None)
        if max_p95 is not None:
            reason = self._slow_device(samples, float(max_p95))
            if reason is not None:
                return reason
        floors = self.floors()
        if health is not None and health.min_quality is not None:
            floors.setdefault(canonical_metric(health.metric or eval_metric or ACCURACY), health.min_quality)
        for name, floor in floors.items():
            reason = self._below(
                f"eval-set {name}", [s.quality[name] for s in samples if name in s.quality], floor, name
            )
            if reason is not None:
                return reason
        # Live agreement with the replaced model is gated only by floors the rule sets itself: the
        # manifest's floor is about the reference model, and two versions legitimately differ.
        for name, floor in self.floors().items():
            reason = self._shadow_below(samples, name, floor)
            if reason is not None:
                return reason
        if ACCURACY in floors:
            live = [s.live_accuracy for s in samples if s.live_accuracy is not None]
            return self._below("live accuracy", live, floors[ACCURACY], ACCURACY)
        return None

    def _slow_device(self, samples: Sequence[TelemetrySample], max_p95: float) -> str | None:
        """The reason when one device's p95 (its own windows, enough of them) is above `max_p95`."""
        by_device: dict[str, list[TelemetrySample]] = {}
        for s in samples:
            if s.count > 0 and s.p95_ms is not None:
                by_device.setdefault(s.device_id, []).append(s)
        for device, windows in sorted(by_device.items()):
            total = sum(s.count for s in windows)
            if len(windows) < self.min_samples or total < self.min_requests:
                continue
            # Weighted by requests: one slow window with 2 requests must not outvote a busy fast one.
            p95 = sum(float(s.p95_ms or 0.0) * s.count for s in windows) / total
            if p95 > max_p95:
                return (
                    f"p95 latency {p95:.3f} ms on {device} is above its bundle's {max_p95:g} ms budget "
                    f"({len(windows)} telemetry windows, {total} requests)"
                )
        return None

    def _shadow_below(self, samples: Sequence[TelemetrySample], name: str, floor: float) -> str | None:
        """The reason when live (shadow) `name` over enough compared requests misses `floor`."""
        windows = [s for s in samples if name in s.shadow and s.shadow_samples > 0]
        total = sum(s.shadow_samples for s in windows)
        if not windows or len(windows) < self.min_samples or total < self.min_requests:
            return None
        mean = sum(s.shadow[name] * s.shadow_samples for s in windows) / total
        if passes(mean, floor, name):
            return None
        return (
            f"live {name} {mean:.4f} with the replaced model {_misses(name)} {floor:g} "
            f"({total} live requests compared in {len(windows)} telemetry windows)"
        )

    def _below(self, label: str, values: Sequence[float], floor: float, name: str) -> str | None:
        """The reason when the mean of `values` (enough of them) misses `floor`, else None."""
        if len(values) < self.min_samples:
            return None
        mean = sum(values) / len(values)
        if passes(mean, floor, name):
            return None
        return (
            f"{label} {mean:.4f} on the updated devices {_misses(name)} {floor:g} "
            f"({len(values)} telemetry windows)"
        )


def _misses(name: str) -> str:
    """How a value misses its bound: below a minimum, or above a maximum for a lower-is-better metric."""
    return "is below the minimum" if ALL_METRICS[name].higher_is_better else "is above the maximum"


def rules_with(rules: AbortRules, floors: Mapping[str, float]) -> AbortRules:
    """`rules` with the quality floors given by gate name (`min_accuracy`, `min_agreement`, `min_fidelity`)."""
    gates = {m.gate for m in METRICS.values()}
    unknown = sorted(set(floors) - gates)
    if unknown:
        raise StrategyError(f"unknown quality gate {', '.join(unknown)}; use {', '.join(sorted(gates))}")
    return replace(
        rules,
        min_accuracy=floors.get("min_accuracy", rules.min_accuracy),
        min_agreement=floors.get("min_agreement", rules.min_agreement),
        min_fidelity=floors.get("min_fidelity", rules.min_fidelity),
    )
