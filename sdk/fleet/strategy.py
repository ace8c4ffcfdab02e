"""Rollout strategies (`all`, `canary:PCT`, `waves:P1,P2,...`), wave planning and abort rules.

Abort rules follow AWS IoT Jobs: a share of failed / rejected / timed-out devices counts only once a
minimum number of devices has finished, so one early failure in a big wave does not stop everything.
They also read the devices' telemetry: accuracy below the manifest's minimum, or p95 latency above its
maximum, on the devices already updated aborts the rollout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from edgefleet.sdk.fleet.errors import StrategyError

FAILED_STATUSES = frozenset({"rejected", "timed-out", "failed"})


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
class AbortRules:
    """When a rollout stops by itself.

    `max_failed_pct`: abort when the share of failed / rejected / timed-out devices among those finished
    exceeds it, once at least `min_finished` devices have finished. `telemetry`: also abort on the
    updated devices' telemetry (accuracy below `min_accuracy`, p95 above `max_p95_ms`; each defaults to
    the manifest's health policy), once `min_samples` telemetry windows with traffic came in.
    """

    max_failed_pct: float = 0.0
    min_finished: int = 1
    telemetry: bool = True
    min_samples: int = 1
    max_p95_ms: float | None = None
    min_accuracy: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 <= self.max_failed_pct < 100:
            raise StrategyError(f"max failed share {self.max_failed_pct} must be in [0, 100) percent")
        if self.min_finished < 1 or self.min_samples < 1:
            raise StrategyError("the minimum counts of an abort rule must be at least 1")
        if self.max_p95_ms is not None and self.max_p95_ms <= 0:
            raise StrategyError(f"max p95 {self.max_p95_ms} ms must be above 0")
        if self.min_accuracy is not None and not 0 <= self.min_accuracy <= 1:
            raise StrategyError(f"min accuracy {self.min_accuracy} must be in [0, 1]")

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
        finished = [s for s in statuses.values() if s in FAILED_STATUSES or s == "deployed"]
        failed = [s for s in finished if s in FAILED_STATUSES]
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

    def check_telemetry(self, samples: Sequence[Mapping[str, Any]], health: Mapping[str, Any]) -> str | None:
        """The abort reason from telemetry windows of updated devices (new model only), or None.

        Each sample is a flat telemetry row: device_id, count, p95_ms, eval_accuracy, live_accuracy.
        """
        if not self.telemetry:
            return None
        max_p95 = self.max_p95_ms if self.max_p95_ms is not None else health.get("max_p95_ms")
        min_acc = self.min_accuracy if self.min_accuracy is not None else health.get("min_accuracy")
        with_traffic = [s for s in samples if (s.get("count") or 0) > 0 and s.get("p95_ms") is not None]
        if max_p95 is not None and len(with_traffic) >= self.min_samples:
            # Weighted by requests: one slow window with 2 requests must not outvote a busy fast one.
            total = sum(int(s["count"]) for s in with_traffic)
            p95 = sum(float(s["p95_ms"]) * int(s["count"]) for s in with_traffic) / total
            if p95 > float(max_p95):
                devs = sorted({str(s.get("device_id")) for s in with_traffic})
                return (
                    f"p95 latency {p95:.3f} ms on the updated devices ({', '.join(devs)}) is above the "
                    f"{float(max_p95):g} ms budget ({len(with_traffic)} telemetry windows, {total} requests)"
                )
        if min_acc is not None:
            for key in ("eval_accuracy", "live_accuracy"):
                values = [float(s[key]) for s in samples if s.get(key) is not None]
                if len(values) >= self.min_samples:
                    acc = sum(values) / len(values)
                    if acc < float(min_acc):
                        label = "eval-set" if key == "eval_accuracy" else "live"
                        return (
                            f"{label} accuracy {acc:.4f} on the updated devices is below the minimum "
                            f"{float(min_acc):g} ({len(values)} telemetry windows)"
                        )
        return None
