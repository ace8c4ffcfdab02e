"""Every MQTT topic of the contract, built and parsed in one place.

Layout under `edgefleet/v1/{fleet}`:
  dev/{id}/state | evt | telemetry          device → host (state is retained; the Last Will sets it offline)
  dev/{id}/cmd                              host → device commands
  dev/{id}/chunk/{sha256}/{index}           chunks re-sent to one device (repairs)
  artifact/{sha256}/{index}                 chunks broadcast to every device of the fleet
  host/sync/{nonce}                         the host's own round-trip marker (registry sync)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from edgefleet.agent.core.codes import Code, StrEnum
from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.wire import valid_name, valid_sha256

TOPIC_ROOT = "edgefleet/v1"


class TopicKind(StrEnum):
    """What a topic carries (its last fixed level)."""

    STATE = "state"
    EVT = "evt"
    TELEMETRY = "telemetry"
    CMD = "cmd"
    CHUNK = "chunk"
    ARTIFACT = "artifact"
    HOST_SYNC = "sync"


# Kinds that sit directly under dev/{id}/ and end the topic.
_DEVICE_KINDS = {k.value: k for k in (TopicKind.STATE, TopicKind.EVT, TopicKind.TELEMETRY, TopicKind.CMD)}


@dataclass(frozen=True)
class TopicParts:
    """A parsed topic: its fleet and kind, and the device, chunk or nonce it names (None where none)."""

    fleet: str
    kind: TopicKind
    device: Optional[str] = None
    sha256: Optional[str] = None
    index: Optional[int] = None
    nonce: Optional[str] = None


def _check_name(label: str, value: str) -> None:
    if not valid_name(value):
        raise ProtocolError(
            Code.BAD_FIELD,
            f"{label} {value!r} is not usable in a topic: use 1-128 letters, digits, '.', '_' or '-'",
        )


def _chunk_ref(topic: str, rest: Tuple[str, ...]) -> Tuple[str, int]:
    """(sha256, index) from the two levels after `artifact/` or `chunk/`; BAD_TOPIC when malformed."""
    if len(rest) != 2:
        raise ProtocolError(Code.BAD_TOPIC, f"chunk topic {topic!r} must end in /<sha256>/<index>")
    sha, idx = rest
    if not valid_sha256(sha):
        raise ProtocolError(Code.BAD_TOPIC, f"chunk topic {topic!r} has no valid sha256")
    if not idx.isdigit() or len(idx) > 9:
        raise ProtocolError(Code.BAD_TOPIC, f"chunk topic {topic!r} has no valid chunk index")
    return sha, int(idx)


@dataclass(frozen=True)
class Topics:
    """Every topic one device uses, under `edgefleet/v1/{fleet}`; the static methods cover a whole fleet."""

    fleet: str
    device_id: str

    def __post_init__(self) -> None:
        _check_name("fleet", self.fleet)
        _check_name("device id", self.device_id)

    # -- one device ----------------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The fleet's topic prefix."""
        return Topics.fleet_prefix(self.fleet)

    @property
    def device(self) -> str:
        """The device's own topic prefix."""
        return f"{self.prefix}/dev/{self.device_id}"

    @property
    def state(self) -> str:
        """Retained birth / Last Will topic."""
        return f"{self.device}/state"

    @property
    def cmd(self) -> str:
        """Commands from the host."""
        return f"{self.device}/cmd"

    @property
    def evt(self) -> str:
        """Progress, outcomes, missing chunk ranges and errors."""
        return f"{self.device}/evt"

    @property
    def telemetry(self) -> str:
        """Periodic metrics."""
        return f"{self.device}/telemetry"

    @property
    def all(self) -> str:
        """Subscription for every topic of this device."""
        return f"{self.device}/#"

    @property
    def repair_filter(self) -> str:
        """Subscription for chunks re-sent to this device alone."""
        return f"{self.device}/chunk/#"

    def artifact(self, sha256: str, index: int) -> str:
        """Broadcast topic of one chunk."""
        return Topics.broadcast(self.fleet, sha256, index)

    def artifact_filter(self, sha256: str) -> str:
        """Subscription for every broadcast chunk of one file."""
        return f"{self.prefix}/artifact/{sha256}/+"

    def repair(self, sha256: str, index: int) -> str:
        """Repair topic of one chunk for this device."""
        return f"{self.device}/chunk/{sha256}/{index}"

    def parse_chunk_topic(self, topic: str) -> Optional[Tuple[str, int]]:
        """Return (sha256, index) when `topic` is a chunk topic of this device or fleet, else None.

        Raises ProtocolError for a chunk topic whose hash or index is malformed.
        """
        for base in (f"{self.prefix}/artifact/", f"{self.device}/chunk/"):
            if topic.startswith(base):
                return _chunk_ref(topic, tuple(topic[len(base) :].split("/")))
        return None

    # -- a whole fleet -------------------------------------------------------------------------------

    @staticmethod
    def pattern(fleet: str, placeholder: str) -> Topics:
        """The topics of any device: `+` (an MQTT wildcard) or `%u` (Mosquitto ACL's username) as its id."""
        if placeholder not in ("+", "%u"):
            raise ValueError(
                f"placeholder {placeholder!r} must be '+' or '%u'; use Topics(fleet, id) for a device"
            )
        _check_name("fleet", fleet)
        topics = object.__new__(Topics)
        object.__setattr__(topics, "fleet", fleet)
        object.__setattr__(topics, "device_id", placeholder)
        return topics

    @staticmethod
    def root() -> str:
        """The protocol's topic root, `edgefleet/v1`."""
        return TOPIC_ROOT

    @staticmethod
    def fleet_prefix(fleet: str) -> str:
        """`edgefleet/v1/{fleet}`."""
        _check_name("fleet", fleet)
        return f"{TOPIC_ROOT}/{fleet}"

    @staticmethod
    def fleet_filter(fleet: str) -> str:
        """Subscription for every topic of a fleet."""
        return f"{Topics.fleet_prefix(fleet)}/#"

    @staticmethod
    def devices(fleet: str, kind: str = "#") -> str:
        """Subscription for one kind (`state`, `evt`, `telemetry`, `cmd`) of every device, or all (`#`)."""
        if kind != "#" and kind not in _DEVICE_KINDS:
            raise ValueError(f"topic kind {kind!r} is not one of {sorted(_DEVICE_KINDS)} or '#'")
        return f"{Topics.fleet_prefix(fleet)}/dev/+/{kind}"

    @staticmethod
    def broadcast(fleet: str, sha256: str, index: int) -> str:
        """Broadcast topic of one chunk of a fleet."""
        return f"{Topics.fleet_prefix(fleet)}/artifact/{sha256}/{index}"

    @staticmethod
    def hashes(fleet: str, sha256: str) -> str:
        """Retained hash index of one file (its chunk and prefix digests, published once per file).

        Two levels below the file's chunks, so the `artifact/{sha256}/+` subscription of an agent
        that predates it never receives it.
        """
        return f"{Topics.fleet_prefix(fleet)}/artifact/{sha256}/hashes/v1"

    @staticmethod
    def broadcast_filter(fleet: str) -> str:
        """Subscription for every broadcast chunk of a fleet."""
        return f"{Topics.fleet_prefix(fleet)}/artifact/#"

    @staticmethod
    def host_sync(fleet: str, nonce: str) -> str:
        """The host's round-trip marker topic (registry sync)."""
        return f"{Topics.fleet_prefix(fleet)}/host/sync/{nonce}"

    @staticmethod
    def host_filter(fleet: str) -> str:
        """Subscription for the host's own topics."""
        return f"{Topics.fleet_prefix(fleet)}/host/#"

    @staticmethod
    def parse(topic: str) -> Optional[TopicParts]:
        """What a topic of the contract names, or None for any other topic (or a malformed chunk topic)."""
        parts = topic.split("/")
        root = TOPIC_ROOT.split("/")
        if len(parts) < 4 or parts[: len(root)] != root or not valid_name(parts[2]):
            return None
        fleet, rest = parts[2], parts[3:]
        try:
            if rest[0] == "dev" and len(rest) >= 3 and valid_name(rest[1]):
                device = rest[1]
                if len(rest) == 3 and rest[2] in _DEVICE_KINDS:
                    return TopicParts(fleet, _DEVICE_KINDS[rest[2]], device)
                if rest[2] == "chunk":
                    sha, index = _chunk_ref(topic, tuple(rest[3:]))
                    return TopicParts(fleet, TopicKind.CHUNK, device, sha, index)
            elif rest[0] == "artifact":
                sha, index = _chunk_ref(topic, tuple(rest[1:]))
                return TopicParts(fleet, TopicKind.ARTIFACT, None, sha, index)
            elif rest[:2] == ["host", "sync"] and len(rest) == 3:
                return TopicParts(fleet, TopicKind.HOST_SYNC, nonce=rest[2])
        except ProtocolError:
            return None
        return None

    @staticmethod
    def device_of(topic: str) -> Optional[str]:
        """The device id a device topic names, else None."""
        parsed = Topics.parse(topic)
        return None if parsed is None else parsed.device

    @staticmethod
    def kind_of(topic: str) -> Optional[TopicKind]:
        """The kind of a contract topic, else None."""
        parsed = Topics.parse(topic)
        return None if parsed is None else parsed.kind


__all__ = ["TOPIC_ROOT", "TopicKind", "TopicParts", "Topics"]
