"""Command authentication: commands signed by the fleet's ONLINE key, bound to one device, a counter, an expiry.

Bundles are signed offline (the fleet key: Uptane's "image" role). Commands are decided at run time, so
they are signed by a separate online key (the "director" role) that the host holds; a leaked online key
can send commands but cannot make a bundle the devices accept. Each signed command carries an `auth`
object:

    {"key": KEYID, "device": ID, "counter": N, "expires": UNIX_S, "delegation": {...}, "sig": BASE64}

The online key reaches the device inside each command, as a `delegation`: `{"online": {"schema",
"public", "expires"}, "signatures": [...]}` signed by the fleet's OFFLINE root key(s) the device already
trusts (its TrustStore, threshold included). So nothing new is provisioned, a rotated root revokes old
online keys, and a key the root never delegated is refused.

`sig` is Ed25519 over `signed_bytes(...)`: a domain prefix and the canonical JSON of the whole command
with `auth` minus `sig`, so no field (the deploy's `device`, a rollback's target) can change unseen.
The agent (`CommandGuard`) refuses, each with its own code:
  - no `auth` at all                       → `command-unsigned` (unless `require_signed_commands = false`)
  - a key it does not trust / a bad sig    → `command-bad-signature`
  - `auth.device` (or `device`) not itself → `command-misaddressed`
  - `expires` in the past                  → `command-expired`
  - `counter` seen before, or older than   → `command-replayed` (kept on disk: survives restarts)
    the newest accepted by more than REORDER_WINDOW   (not for `deploy`: see IDEMPOTENT_TYPES)

The counter is the host's clock in milliseconds (sdk/trust/command_signing.py), so it needs no host-side
state. Two host processes (rollout engine, CLI) commanding one device may deliver their commands out of
signing order; the window lets a command up to REORDER_WINDOW older than the newest accepted one
through once (its counter joins the `seen` set), instead of refusing it as a replay. A counter at or
below the window's floor, or already seen, is refused.
Standard library and PyNaCl only; Python 3.8.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
from typing import Any, Dict, Mapping, Optional

from edgefleet.agent.core.errors import ProtocolError, VerifyError
from edgefleet.agent.core.fsutil import atomic_write_json, read_json
from edgefleet.agent.core.trust import TrustStore, key_id

AUTH_FIELD = "auth"
# The last accepted counter, in the agent's state folder.
COUNTER_FILE = "command-counter.json"
DOMAIN = b"edgefleet-command/1\n"
DELEGATION_DOMAIN = b"edgefleet-online-key/1\n"
DELEGATION_SCHEMA = "edgefleet.online-key/1"
# Host default: long enough for a broker outage and the agent's reconnect, short enough that a captured
# command is useless soon after.
DEFAULT_TTL_S = 3600.0
# Clock skew tolerated on `expires` (devices without RTC sync drift).
CLOCK_SKEW_S = 300.0
# Counters are host milliseconds: commands signed up to 60 s apart may arrive in either order.
REORDER_WINDOW = 60_000
# Counters remembered inside the window; past this the oldest are dropped and the floor rises to them.
MAX_SEEN = 256

# Commands whose handler answers a repeat by its id (and a deploy never installs a version that is not
# newer), so a repeated one passes the counter check: a broker's redelivery must not fail a rollout.
IDEMPOTENT_TYPES = frozenset({"deploy"})

UNSIGNED = "command-unsigned"
BAD_SIGNATURE = "command-bad-signature"
MISADDRESSED = "command-misaddressed"
EXPIRED = "command-expired"
REPLAYED = "command-replayed"
CODES = (UNSIGNED, BAD_SIGNATURE, MISADDRESSED, EXPIRED, REPLAYED)


class CommandAuthError(ProtocolError):
    """A command the agent must not run; `code` is one of CODES, `reason` says why and what to do."""


def signed_bytes(command: Mapping[str, Any]) -> bytes:
    """What the signature covers: the domain prefix and the canonical JSON of the command, `auth.sig` left out."""
    body = {k: v for k, v in command.items() if k != AUTH_FIELD}
    auth = command.get(AUTH_FIELD)
    if isinstance(auth, Mapping):
        body[AUTH_FIELD] = {k: v for k, v in auth.items() if k != "sig"}
    return DOMAIN + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def delegation_bytes(online: Mapping[str, Any]) -> bytes:
    """What the offline root key signs to delegate command signing to an online key."""
    return DELEGATION_DOMAIN + json.dumps(online, sort_keys=True, separators=(",", ":")).encode()


def delegated_key(delegation: Any, root: TrustStore, now: float) -> bytes:
    """The online public key a delegation names, once the root's keys (to its threshold) signed it."""
    online = delegation.get("online") if isinstance(delegation, dict) else None
    if not isinstance(online, dict) or online.get("schema") != DELEGATION_SCHEMA:
        raise CommandAuthError(BAD_SIGNATURE, "the command's online-key delegation is malformed")
    try:
        raw = base64.b64decode(str(online.get("public", "")), validate=True)
        root.verify_signatures(delegation_bytes(online), delegation, threshold=root.threshold)
    except (binascii.Error, ValueError):
        raise CommandAuthError(BAD_SIGNATURE, "the delegated online key is not base64") from None
    except VerifyError as exc:
        raise CommandAuthError(
            BAD_SIGNATURE, f"the online key is not delegated by this fleet's root ({exc.code})"
        ) from None
    expires = online.get("expires")
    if len(raw) != 32:
        raise CommandAuthError(BAD_SIGNATURE, "the delegated online key is not an Ed25519 key")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool) and now > expires + CLOCK_SKEW_S:
        raise CommandAuthError(
            EXPIRED, "the online key's delegation expired; issue a new one with `edgefleet keys online`"
        )
    return raw


def sign_command(
    payload: bytes,
    seed: bytes,
    device: str,
    counter: int,
    *,
    expires: Optional[float] = None,
    now: Optional[float] = None,
    delegation: Optional[Mapping[str, Any]] = None,
) -> bytes:
    """Add an `auth` object to a command's wire bytes, signed with the online key's 32-byte seed."""
    from nacl.signing import SigningKey

    command = json.loads(payload)
    if not isinstance(command, dict):
        raise ValueError("a command is a JSON object")
    signing = SigningKey(seed)
    stamp = time.time() if now is None else now
    command[AUTH_FIELD] = {
        "key": key_id(bytes(signing.verify_key)),
        "device": device,
        "counter": int(counter),
        "expires": round(float(expires if expires is not None else stamp + DEFAULT_TTL_S), 3),
    }
    if delegation is not None:
        command[AUTH_FIELD]["delegation"] = dict(delegation)
    sig = signing.sign(signed_bytes(command)).signature
    command[AUTH_FIELD]["sig"] = base64.b64encode(sig).decode("ascii")
    return json.dumps(command, separators=(",", ":")).encode()


class CommandGuard:
    """The agent's check of every command: trusted online key, addressed to it, fresh, not seen before."""

    def __init__(
        self,
        device_id: str,
        online_keys: Mapping[str, bytes],
        state_path: os.PathLike[str] | str,
        *,
        allow_unsigned: bool = False,
        root: Optional[TrustStore] = None,
    ) -> None:
        self.device_id = device_id
        self.root = root
        self.online_keys = dict(online_keys)
        self.state_path = os.fspath(state_path)
        # Compatibility switch for fleets whose host does not sign yet (`require_signed_commands = false`).
        self.allow_unsigned = allow_unsigned
        self._lock = threading.Lock()
        state = read_json(self.state_path, default={}) or {}
        state = state if isinstance(state, dict) else {}
        self.last_counter = _int(state.get("counter"), -1)
        # Counters at or below `floor` are replays; a state written before the window has no floor, and
        # its counter then is one (nothing older was remembered).
        self.floor = _int(state.get("floor"), self.last_counter)
        seen = state.get("seen")
        self.seen = {c for c in seen if _int(c, None) == c} if isinstance(seen, list) else set()

    def check(self, payload: bytes, now: Optional[float] = None) -> Dict[str, Any]:
        """accept() and commit() in one: the command as a dict when it may run."""
        command = self.accept(payload, now)
        self.commit(command)
        return command

    def commit(self, command: Mapping[str, Any]) -> None:
        """Record an accepted command's counter (durably): from now on it and older ones are replays.

        Called after the command was handled, so a crash in between lets the broker's redelivery
        through again (handlers are idempotent by command id) instead of losing the command.
        """
        auth = command.get(AUTH_FIELD)
        counter = auth.get("counter") if isinstance(auth, Mapping) else None
        if not isinstance(counter, int) or isinstance(counter, bool):
            return
        with self._lock:
            if counter <= self.floor or counter in self.seen:
                return
            seen = self.seen | {counter}
            newest = max(self.last_counter, counter)
            floor = max(self.floor, newest - REORDER_WINDOW)
            seen = {c for c in seen if c > floor}
            while len(seen) > MAX_SEEN:
                oldest = min(seen)
                seen.discard(oldest)
                floor = max(floor, oldest)
            state = {"counter": newest, "floor": floor, "seen": sorted(seen)}
            atomic_write_json(self.state_path, state, mode=0o600)
            self.last_counter, self.floor, self.seen = newest, floor, seen

    def accept(self, payload: bytes, now: Optional[float] = None) -> Dict[str, Any]:
        """The command as a dict when it may run; raises CommandAuthError (code, reason) otherwise."""
        try:
            command = json.loads(payload)
        except ValueError:
            command = None
        if not isinstance(command, dict):
            return {}  # not a command at all: the command parser refuses it with its own code
        auth = command.get(AUTH_FIELD)
        if auth is None:
            if self.allow_unsigned:
                return command
            raise CommandAuthError(
                UNSIGNED,
                "the command carries no online-key signature: give the host an online key (`edgefleet keys "
                "online`, beside the fleet key it trusts), or, for a host that cannot sign yet, set "
                "require_signed_commands = false in this agent's config",
            )
        if not isinstance(auth, dict):
            raise CommandAuthError(BAD_SIGNATURE, "`auth` is not an object")
        stamp = time.time() if now is None else now
        raw = self.online_keys.get(str(auth.get("key")))
        if raw is None and self.root is not None and auth.get("delegation") is not None:
            try:
                raw = delegated_key(auth["delegation"], self.root, stamp)
            except CommandAuthError:
                if self.allow_unsigned:
                    # Signed by a key this fleet's root never delegated: no better than unsigned, which
                    # this device accepts (compatibility mode); strict devices refuse it.
                    return command
                raise
            if key_id(raw) != auth.get("key"):
                raise CommandAuthError(BAD_SIGNATURE, "`auth.key` is not the delegated online key")
        if raw is None and self.allow_unsigned:
            return command
        if raw is None:
            raise CommandAuthError(
                BAD_SIGNATURE,
                f"signed by key {str(auth.get('key'))[:16]}…, which is not an online key this device trusts",
            )
        try:
            sig = base64.b64decode(str(auth.get("sig", "")), validate=True)
        except (binascii.Error, ValueError):
            raise CommandAuthError(BAD_SIGNATURE, "the signature is not base64") from None
        from nacl.exceptions import BadSignatureError
        from nacl.signing import VerifyKey

        try:
            VerifyKey(raw).verify(signed_bytes(command), sig)
        except (BadSignatureError, ValueError):
            raise CommandAuthError(BAD_SIGNATURE, "the signature does not match the command") from None
        target = command.get("device", auth.get("device"))
        if auth.get("device") != self.device_id or target != self.device_id:
            raise CommandAuthError(
                MISADDRESSED, f"the command is for device {auth.get('device')!r}, this is {self.device_id!r}"
            )
        expires = auth.get("expires")
        if (
            not isinstance(expires, (int, float))
            or isinstance(expires, bool)
            or stamp > expires + CLOCK_SKEW_S
        ):
            raise CommandAuthError(EXPIRED, f"the command expired at {expires} (now {stamp:.0f})")
        counter = auth.get("counter")
        if not isinstance(counter, int) or isinstance(counter, bool):
            raise CommandAuthError(BAD_SIGNATURE, "`auth.counter` is not an integer")
        if command.get("type") in IDEMPOTENT_TYPES:
            # Brokers redeliver QoS 1 messages (a NATS node failover resends acknowledged ones too): a
            # repeated deploy goes to its handler, which answers it by id and never installs a version
            # that is not newer, instead of an error the host would count as a failed device.
            return command
        with self._lock:
            if counter in self.seen:
                raise CommandAuthError(REPLAYED, f"counter {counter} was accepted before")
            if counter <= max(self.floor, self.last_counter - REORDER_WINDOW):
                raise CommandAuthError(
                    REPLAYED,
                    f"counter {counter} is older than the newest accepted ({self.last_counter}) by more than "
                    f"the {REORDER_WINDOW} ms reorder window",
                )
        return command


def _int(value: Any, default: Any) -> int:
    """`value` when it is an int (not a bool), else `default`."""
    return value if isinstance(value, int) and not isinstance(value, bool) else default
