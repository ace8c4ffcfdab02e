"""The round plan: canonical JSON the host signs, and the device's check of every value against fixed ranges.

Nothing in a plan is executed: it names numbers (epochs, batch size, learning rate, clipping, noise),
the tensors to read and train, and the current head weights. The ranges below are the device's own:
a plan outside them is refused with `plan-out-of-range`, whoever signed it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.federated_msgs import FedCode
from edgefleet.agent.core.wire import decode_array, encode_array

PLAN_KIND = "edgefleet-fed-plan"
PLAN_VERSION = 1
# The fixed ranges a device accepts (inclusive).
RANGES: Dict[str, Tuple[float, float]] = {
    "epochs": (1, 50),
    "batch": (1, 4096),
    "lr": (1e-6, 10.0),
    "mu": (0.0, 100.0),
    "clip": (1e-6, 1e3),
    "noise": (0.0, 1e3),
    "update_clip": (1e-6, 1e6),
    "max_samples": (1, 1_000_000),
    "min_samples": (1, 1_000_000),
    "noise_share": (0, 1_000_000),
}
MAX_HEAD_PARAMS = 4_000_000
# A plan may not be valid for longer than this (seconds from now): a replayed old plan is dead soon.
MAX_PLAN_LIFETIME_S = 86400.0


class PlanError(AgentError):
    """A round plan the device refuses; `code` is a FedCode."""

    default_code = FedCode.PLAN_INVALID


@dataclass(frozen=True)
class RoundPlan:
    """One device's part of one round, as the device reads it after the signature checked out."""

    task: str
    round: int
    device: str
    expires: float
    model_name: str
    model_version: int
    input: str
    feature: str
    weight: np.ndarray
    bias: np.ndarray
    epochs: int
    batch: int
    lr: float
    mu: float = 0.0
    clip: Optional[float] = None
    noise: float = 0.0
    update_clip: Optional[float] = None
    max_samples: int = 100_000
    # With DP the host calibrated the noise for devices holding at least this many examples.
    min_samples: int = 1
    seed: int = 0
    # Device-level DP under secure aggregation: this device adds its share of the noise, sized for a sum of
    # at least this many devices (0: the host adds the noise, or there is none).
    noise_share: int = 0
    # Secure aggregation: the SecAggSetup of the round (agent/federated/secagg.py), or None.
    secagg: Optional[Dict[str, Any]] = None

    def to_obj(self) -> Dict[str, Any]:
        """The plan as the JSON object the host signs."""
        return {
            "kind": PLAN_KIND,
            "v": PLAN_VERSION,
            "task": self.task,
            "round": self.round,
            "device": self.device,
            "expires": self.expires,
            "model": {"name": self.model_name, "version": self.model_version},
            "input": self.input,
            "feature": self.feature,
            "head": {
                "weight": encode_array(np.ascontiguousarray(self.weight, dtype="<f4")),
                "bias": encode_array(np.ascontiguousarray(self.bias, dtype="<f4")),
            },
            "epochs": self.epochs,
            "batch": self.batch,
            "lr": self.lr,
            "mu": self.mu,
            "clip": self.clip,
            "noise": self.noise,
            "update_clip": self.update_clip,
            "max_samples": self.max_samples,
            "min_samples": self.min_samples,
            "seed": self.seed,
            "secagg": self.secagg,
            "noise_share": self.noise_share,
        }

    def to_bytes(self) -> bytes:
        """Canonical bytes (sorted keys, no spaces): what the fleet key signs."""
        return json.dumps(self.to_obj(), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @property
    def head_size(self) -> int:
        """Numbers in the head (weight and bias): the length of every update."""
        return int(self.weight.size + self.bias.size)


def _num(obj: Mapping[str, Any], key: str, optional: bool = False) -> Optional[float]:
    value = obj.get(key)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PlanError(FedCode.PLAN_INVALID, f"plan field {key!r} must be a number")
    low, high = RANGES.get(key, (float("-inf"), float("inf")))
    if not low <= float(value) <= high:
        raise PlanError(
            FedCode.PLAN_OUT_OF_RANGE, f"plan field {key!r} = {value} is outside [{low:g}, {high:g}]"
        )
    return float(value)


def _whole(obj: Mapping[str, Any], key: str, default: Optional[int] = None) -> int:
    value = obj.get(key)
    if value is None and default is not None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlanError(FedCode.PLAN_INVALID, f"plan field {key!r} must be a whole number")
    _num(obj, key)
    return value


def _text(obj: Mapping[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not 0 < len(value) <= 256:
        raise PlanError(FedCode.PLAN_INVALID, f"plan field {key!r} must be a short string")
    return value


def parse_plan(data: bytes, *, device_id: str, now: Optional[float] = None) -> RoundPlan:
    """Read signed plan bytes (the signature was checked before) and check every value; raises PlanError."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PlanError(FedCode.PLAN_INVALID, "the round plan is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or obj.get("kind") != PLAN_KIND:
        raise PlanError(FedCode.PLAN_INVALID, f"the round plan must be a JSON object of kind {PLAN_KIND!r}")
    if obj.get("v") != PLAN_VERSION:
        raise PlanError(
            FedCode.PLAN_INVALID, f"round plan v{obj.get('v')!r} is not v{PLAN_VERSION}: upgrade the agent"
        )
    if obj.get("device") != device_id:
        raise PlanError(
            FedCode.PLAN_WRONG_DEVICE, f"the plan is for device {obj.get('device')!r}, not {device_id!r}"
        )
    moment = time.time() if now is None else now
    expires = _num(obj, "expires")
    assert expires is not None
    if expires <= moment:
        raise PlanError(FedCode.PLAN_EXPIRED, "the round plan expired; the host starts a new round")
    if expires > moment + MAX_PLAN_LIFETIME_S:
        raise PlanError(FedCode.PLAN_OUT_OF_RANGE, "the round plan is valid for more than a day")
    model = obj.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("version"), int):
        raise PlanError(FedCode.PLAN_INVALID, "plan field 'model' must be {name, version}")
    head = obj.get("head")
    if not isinstance(head, dict):
        raise PlanError(FedCode.PLAN_INVALID, "plan field 'head' must hold 'weight' and 'bias'")
    try:
        weight = np.array(
            decode_array(head.get("weight") or {}, max_bytes=MAX_HEAD_PARAMS * 4), dtype=np.float32
        )
        bias = np.array(decode_array(head.get("bias") or {}, max_bytes=MAX_HEAD_PARAMS * 4), dtype=np.float32)
    except AgentError as exc:
        raise PlanError(FedCode.PLAN_INVALID, f"plan head: {exc.reason}") from None
    if weight.ndim != 2 or bias.shape != (weight.shape[1],) or not np.isfinite(weight).all():
        raise PlanError(
            FedCode.PLAN_INVALID, "plan head must be a finite (features, classes) weight and (classes,) bias"
        )
    if weight.size + bias.size > MAX_HEAD_PARAMS:
        raise PlanError(FedCode.PLAN_OUT_OF_RANGE, f"the head has more than {MAX_HEAD_PARAMS} numbers")
    seed = obj.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 1 << 63:
        raise PlanError(FedCode.PLAN_INVALID, "plan field 'seed' must be a non-negative integer")
    round_no = obj.get("round")
    if isinstance(round_no, bool) or not isinstance(round_no, int) or not 0 <= round_no < 1 << 30:
        raise PlanError(FedCode.PLAN_INVALID, "plan field 'round' must be a non-negative integer")
    secagg = obj.get("secagg")
    if secagg is not None and not isinstance(secagg, dict):
        raise PlanError(
            FedCode.PLAN_INVALID, "plan field 'secagg' must be the round's secure-aggregation setup"
        )
    return RoundPlan(
        secagg=secagg,
        task=_text(obj, "task"),
        round=round_no,
        device=device_id,
        expires=expires,
        model_name=_text(model, "name"),
        model_version=int(model["version"]),
        input=_text(obj, "input"),
        feature=_text(obj, "feature"),
        weight=weight,
        bias=bias,
        epochs=_whole(obj, "epochs"),
        batch=_whole(obj, "batch"),
        lr=float(_num(obj, "lr") or 0.0),
        mu=float(_num(obj, "mu", optional=True) or 0.0),
        clip=_num(obj, "clip", optional=True),
        noise=float(_num(obj, "noise", optional=True) or 0.0),
        update_clip=_num(obj, "update_clip", optional=True),
        max_samples=_whole(obj, "max_samples", 100_000),
        min_samples=_whole(obj, "min_samples", 1),
        noise_share=_whole(obj, "noise_share", 0),
        seed=seed,
    )


__all__ = ["MAX_PLAN_LIFETIME_S", "PLAN_KIND", "RANGES", "PlanError", "RoundPlan", "parse_plan"]
