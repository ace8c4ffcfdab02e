"""Federated fine-tuning on the wire: the signed round plan (host → device) and the update / ack events.

The round plan travels as the exact canonical JSON bytes the host signed with the fleet key (like a
deploy's manifest), so the device checks the signature over the bytes before it parses anything. The
plan is data only: how many epochs, which batch size and learning rate, clipping and noise, all within
fixed ranges the device checks (agent/federated/plan.py). Updates carry the head's change as raw
little-endian numbers (never an input row or a label); acks say whether a device took a plan or why not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Dict, FrozenSet, Mapping, Optional, Tuple

from edgefleet.agent.core.codes import Code
from edgefleet.agent.core.commands import COMMANDS, Command
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.events import DEVICE_MESSAGES, DeviceMessage
from edgefleet.agent.core.wire import b64, get_b64, get_dict, get_int, get_list, get_str, wire_class

# An update larger than this is refused unread by both sides (the head of a small classifier is KiB).
MAX_UPDATE_BYTES = 8 << 20
MAX_RANK = 8


class FedCode:
    """Codes of federated refusals (device refusing a plan, host refusing an update)."""

    PLAN_UNSIGNED = "plan-unsigned"
    PLAN_INVALID = "plan-invalid"
    PLAN_EXPIRED = "plan-expired"
    PLAN_WRONG_DEVICE = "plan-wrong-device"
    PLAN_WRONG_MODEL = "plan-wrong-model"
    PLAN_OUT_OF_RANGE = "plan-out-of-range"
    NO_TRAIN_DATA = "no-train-data"
    NO_FEATURES = "no-feature-output"
    BUSY = "fed-busy"
    TRAIN_FAILED = "train-failed"
    UPDATE_SHAPE = "update-wrong-shape"
    UPDATE_NOT_FINITE = "update-not-finite"
    UPDATE_NORM = "update-norm-over-bound"
    UPDATE_TOO_LARGE = "update-too-large"
    UPDATE_STALE = "update-stale"
    UPDATE_DUPLICATE = "update-duplicate"
    SECAGG_FAILED = "secagg-failed"


@wire_class
@dataclass(frozen=True)
class FedRoundCommand(Command):
    """One round of federated training for one device: the signed plan bytes and their signatures."""

    TYPE: ClassVar[str] = "fed-round"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "plan", "signatures"})
    plan: bytes = b""
    signatures: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {"plan": b64(self.plan), "signatures": self.signatures}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> FedRoundCommand:
        plan = get_b64(obj, "plan")
        if not plan:
            raise ProtocolError(Code.BAD_FIELD, "field 'plan' must hold the signed round plan")
        return cls(**base, plan=plan, signatures=get_dict(obj, "signatures"))


@wire_class
@dataclass(frozen=True)
class FedUpdate(DeviceMessage):
    """A device's trained change of the head for one round: `shape` numbers of `dtype`, and its sample count."""

    TYPE: ClassVar[str] = "fed-update"
    KEYS: ClassVar[FrozenSet[str]] = frozenset(
        {"task", "round", "ref", "samples", "dtype", "shape", "data", "detail"}
    )
    task: str = ""
    round: int = 0
    # The id of the round command this answers.
    ref: str = ""
    samples: int = 0
    dtype: str = "float32"
    shape: Tuple[int, ...] = ()
    data: bytes = b""
    # Training statistics (steps, seconds, loss): numbers about the run, never rows of data.
    detail: Dict[str, Any] = field(default_factory=dict)

    def _fields(self) -> Dict[str, Any]:
        return {
            "task": self.task,
            "round": self.round,
            "ref": self.ref,
            "samples": self.samples,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "data": b64(self.data),
            "detail": self.detail,
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> FedUpdate:
        shape = get_list(obj, "shape", max_len=MAX_RANK)
        if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 30 for d in shape):
            raise ProtocolError(Code.BAD_FIELD, "field 'shape' must list non-negative integers")
        data = get_b64(obj, "data")
        if len(data) > MAX_UPDATE_BYTES:
            raise ProtocolError(Code.PAYLOAD_TOO_LARGE, f"an update holds at most {MAX_UPDATE_BYTES} bytes")
        return cls(
            **base,
            task=get_str(obj, "task", max_len=128),
            round=get_int(obj, "round", maximum=1 << 30),
            ref=get_str(obj, "ref", max_len=128),
            samples=get_int(obj, "samples", maximum=1 << 40),
            dtype=get_str(obj, "dtype", max_len=16),
            shape=tuple(shape),
            data=data,
            detail=get_dict(obj, "detail", optional=True),
        )


@wire_class
@dataclass(frozen=True)
class FedAck(DeviceMessage):
    """A device took a round plan (`accepted`) or refused it (`refused`, with a code and a reason)."""

    TYPE: ClassVar[str] = "fed-ack"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"task", "round", "ref", "status", "code", "reason"})
    task: str = ""
    round: int = 0
    ref: str = ""
    status: str = "accepted"
    code: Optional[str] = None
    reason: str = ""

    def _fields(self) -> Dict[str, Any]:
        return {
            "task": self.task,
            "round": self.round,
            "ref": self.ref,
            "status": self.status,
            "code": self.code,
            "reason": self.reason,
        }

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> FedAck:
        return cls(
            **base,
            task=get_str(obj, "task", max_len=128),
            round=get_int(obj, "round", maximum=1 << 30),
            ref=get_str(obj, "ref", max_len=128),
            status=get_str(obj, "status", max_len=32),
            code=get_str(obj, "code", optional=True, max_len=64),
            reason=get_str(obj, "reason", max_len=4096),
        )


# Secure aggregation (SecAgg+) stages: host → device names what it carries, device → host what it answers.
SECAGG_TO_DEVICE = ("keys", "shares", "unmask")
SECAGG_TO_HOST = ("advertise", "shares", "masked", "unmasked")


@wire_class
@dataclass(frozen=True)
class FedStepCommand(Command):
    """One secure-aggregation stage of a round, host → device: the peers' keys, the shares, the unmask request.

    Unsigned on purpose: the round plan that set the round up is signed, and the SecAgg messages are
    checked by the protocol itself (encrypted and bound to the round); a bad one only fails the round.
    """

    TYPE: ClassVar[str] = "fed-step"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"id", "task", "round", "stage", "payload"})
    task: str = ""
    round: int = 0
    stage: str = ""
    payload: bytes = b""

    def _fields(self) -> Dict[str, Any]:
        return {"task": self.task, "round": self.round, "stage": self.stage, "payload": b64(self.payload)}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> FedStepCommand:
        return cls(
            **base,
            task=get_str(obj, "task", max_len=128),
            round=get_int(obj, "round", maximum=1 << 30),
            stage=get_str(obj, "stage", max_len=32),
            payload=get_b64(obj, "payload"),
        )


@wire_class
@dataclass(frozen=True)
class FedStep(DeviceMessage):
    """One secure-aggregation stage of a round, device → host: keys, encrypted shares, masked input, unmasking."""

    TYPE: ClassVar[str] = "fed-step"
    KEYS: ClassVar[FrozenSet[str]] = frozenset({"task", "round", "stage", "payload"})
    task: str = ""
    round: int = 0
    stage: str = ""
    payload: bytes = b""

    def _fields(self) -> Dict[str, Any]:
        return {"task": self.task, "round": self.round, "stage": self.stage, "payload": b64(self.payload)}

    @classmethod
    def _parse(cls, obj: Mapping[str, Any], base: Dict[str, Any]) -> FedStep:
        payload = get_b64(obj, "payload")
        if len(payload) > MAX_UPDATE_BYTES:
            raise ProtocolError(
                Code.PAYLOAD_TOO_LARGE, f"a secure-aggregation message holds at most {MAX_UPDATE_BYTES} bytes"
            )
        return cls(
            **base,
            task=get_str(obj, "task", max_len=128),
            round=get_int(obj, "round", maximum=1 << 30),
            stage=get_str(obj, "stage", max_len=32),
            payload=payload,
        )


# Known to parse_command / parse_device_message (importing this module, as protocol.py does, registers them).
COMMANDS[FedRoundCommand.TYPE] = FedRoundCommand
COMMANDS[FedStepCommand.TYPE] = FedStepCommand
for _cls in (FedUpdate, FedAck, FedStep):
    DEVICE_MESSAGES[_cls.TYPE] = _cls

__all__ = [
    "MAX_UPDATE_BYTES",
    "SECAGG_TO_DEVICE",
    "SECAGG_TO_HOST",
    "FedAck",
    "FedCode",
    "FedRoundCommand",
    "FedStep",
    "FedStepCommand",
    "FedUpdate",
]
