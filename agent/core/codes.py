"""Codes and states both sides share: error codes, install steps and states, rollout statuses, quality names.

Each is a string on the wire and in the store, so the enums derive from `str`: a member equals its plain
string, JSON-encodes as it and formats as it, and rows written before the enums existed still compare equal.
"""

from __future__ import annotations

from enum import Enum
from typing import FrozenSet


class Code:
    """Stable machine-readable error codes carried by `Error` events."""

    BAD_JSON = "bad-json"
    BAD_MESSAGE = "bad-message"
    MISSING_FIELD = "missing-field"
    BAD_FIELD = "bad-field"
    UNKNOWN_TYPE = "unknown-type"
    UNSUPPORTED_VERSION = "unsupported-version"
    WRONG_DEVICE = "wrong-device"
    PAYLOAD_TOO_LARGE = "payload-too-large"
    BAD_TOPIC = "bad-topic"
    UNKNOWN_TRANSFER = "unknown-transfer"
    CHUNK_INDEX = "chunk-index-out-of-range"
    CHUNK_OVERSIZE = "chunk-oversize"
    CHUNK_SIZE = "chunk-size-mismatch"
    CHUNK_HASH = "chunk-hash-mismatch"
    HASH_MISMATCH = "hash-mismatch"
    TRANSFER_TIMEOUT = "transfer-timeout"
    BUSY = "busy"
    NO_MODEL = "no-model"
    INFER_DISABLED = "infer-disabled"
    INTERNAL = "internal-error"


class StrEnum(str, Enum):
    """A str Enum whose str() and format() give the value on every Python from 3.8 (3.12 changed format)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class InstallStep(StrEnum):
    """The `step` of Progress and Rejected events: where a deployment is or where it failed."""

    VERIFY_MANIFEST = "verify-manifest"
    DOWNLOAD = "download"
    DOWNLOADED = "downloaded"
    VERIFY = "verify"
    WRITE = "write"
    LOAD = "load"
    HEALTH = "health"
    SWITCH = "switch"
    SWITCHED = "switched"
    INSTALL = "install"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    RECOVER_FAILED = "recover-failed"
    REJECTED = "rejected"


class InstallState(StrEnum):
    """Where the device's download/install machine is."""

    IDLE = "idle"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    DEPLOYED = "deployed"
    REJECTED = "rejected"


class RolloutStatus(StrEnum):
    """A rollout's status in the store."""

    PENDING = "pending"
    RUNNING = "running"
    ABORTING = "aborting"
    SUCCEEDED = "succeeded"
    COMPLETED = "completed"
    ABORTED = "aborted"


ACTIVE_ROLLOUT: FrozenSet[RolloutStatus] = frozenset(
    {RolloutStatus.PENDING, RolloutStatus.RUNNING, RolloutStatus.ABORTING}
)
ENDED_ROLLOUT: FrozenSet[RolloutStatus] = frozenset(
    {RolloutStatus.SUCCEEDED, RolloutStatus.COMPLETED, RolloutStatus.ABORTED}
)


class DeviceStatus(StrEnum):
    """One device's status inside a rollout."""

    PENDING = "pending"
    SENT = "sent"
    DOWNLOADING = "downloading"
    INSTALLING = "installing"
    DEPLOYED = "deployed"
    REJECTED = "rejected"
    TIMED_OUT = "timed-out"
    ROLLING_BACK = "rolling-back"
    ROLLED_BACK = "rolled-back"
    ROLLBACK_FAILED = "rollback-failed"
    NOT_NOTIFIED = "not-notified"
    NO_BUNDLE = "no-bundle"
    ABORTED = "aborted"


IN_FLIGHT: FrozenSet[DeviceStatus] = frozenset(
    {DeviceStatus.SENT, DeviceStatus.DOWNLOADING, DeviceStatus.INSTALLING}
)
FINISHED_DEVICE: FrozenSet[DeviceStatus] = frozenset(
    {
        DeviceStatus.DEPLOYED,
        DeviceStatus.REJECTED,
        DeviceStatus.TIMED_OUT,
        DeviceStatus.ROLLED_BACK,
        DeviceStatus.ROLLBACK_FAILED,
        DeviceStatus.NOT_NOTIFIED,
        DeviceStatus.NO_BUNDLE,
        DeviceStatus.ABORTED,
    }
)
# Devices in these statuses should go back to the model they ran before the rollout.
RESTORE_DESIRED: FrozenSet[DeviceStatus] = frozenset(
    {DeviceStatus.REJECTED, DeviceStatus.TIMED_OUT, DeviceStatus.ROLLED_BACK, DeviceStatus.ABORTED}
)
# Outcomes the abort rules count as failures.
FAILED_DEVICE: FrozenSet[DeviceStatus] = frozenset({DeviceStatus.REJECTED, DeviceStatus.TIMED_OUT})


class QualityMetric(StrEnum):
    """The quality vocabulary: one name per metric everywhere (manifest, telemetry, store, gates).

    These three have a store column and a rollout-rule field each; the task metrics are `TaskMetric`.
    """

    ACCURACY = "accuracy"
    AGREEMENT = "agreement"
    FIDELITY = "fidelity"


class TaskMetric(StrEnum):
    """The task metrics of the vocabulary (docs/quality.md); token_error_rate is better when lower."""

    MAP50 = "map50"
    TOKEN_ERROR_RATE = "token_error_rate"
    EMBEDDING_COSINE = "embedding_cosine"


class QualityTask(StrEnum):
    """`edgefleet build --task`: which metric scores the model (`auto` infers it from outputs and labels)."""

    CLASSIFICATION = "classification"
    DETECTION = "detection"
    CTC = "ctc"
    EMBEDDING = "embedding"
    AUTO = "auto"


class QualitySource(StrEnum):
    """Where a telemetry quality reading comes from."""

    EVAL = "eval"
    FEEDBACK = "feedback"
    SHADOW = "shadow"


__all__ = [
    "ACTIVE_ROLLOUT",
    "ENDED_ROLLOUT",
    "FAILED_DEVICE",
    "FINISHED_DEVICE",
    "IN_FLIGHT",
    "RESTORE_DESIRED",
    "Code",
    "DeviceStatus",
    "InstallState",
    "InstallStep",
    "QualityMetric",
    "QualitySource",
    "QualityTask",
    "RolloutStatus",
    "StrEnum",
    "TaskMetric",
]
