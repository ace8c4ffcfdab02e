"""The host's online command key: created beside the fleet key, delegated by it, signs every command.

`edgefleet keys init` (or `edgefleet keys online` for a fleet made before) writes `online.key` (the
32-byte Ed25519 seed, 0600) and `online.json` (the delegation: the online public key and its expiry,
signed by the offline fleet key). The fleet key can then go offline; the online key signs commands
(agent/core/command_auth.py has the format and the device-side check).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from edgefleet.agent.core.command_auth import DELEGATION_SCHEMA, delegation_bytes, sign_command
from edgefleet.agent.core.fsutil import atomic_write_bytes, atomic_write_json, read_json
from edgefleet.sdk.errors import EdgefleetError

ONLINE_KEY_FILE = "online.key"
DELEGATION_FILE = "online.json"
DEFAULT_ONLINE_DAYS = 365
# A key folder holding online.key, for host processes that are given no trusted key.
COMMAND_KEYS_ENV = "EDGEFLEET_COMMAND_KEYS"
log = logging.getLogger(__name__)
PathLike = Union[str, "os.PathLike[str]"]


class CommandKeyError(EdgefleetError):
    """The online command key is missing or unreadable; the message says how to make one."""


def init_online_key(
    directory: Path, fleet_key: Any, *, days: int = DEFAULT_ONLINE_DAYS, force: bool = False
) -> Path:
    """Create the online key in `directory` and its delegation signed by `fleet_key` (the offline key)."""
    from nacl.signing import SigningKey

    from edgefleet.sdk.trust.keys import sign

    if days < 1:
        raise CommandKeyError("--days must be at least 1")
    key_path = directory / ONLINE_KEY_FILE
    if key_path.exists() and not force:
        raise CommandKeyError(f"{key_path} already exists; pass --force to replace the online key")
    seed = os.urandom(32)
    online = {
        "schema": DELEGATION_SCHEMA,
        "public": base64.b64encode(bytes(SigningKey(seed).verify_key)).decode("ascii"),
        "expires": int(time.time() + days * 86400),
    }
    delegation = {"online": online, "signatures": [sign(delegation_bytes(online), fleet_key)]}
    atomic_write_bytes(key_path, base64.b64encode(seed) + b"\n", mode=0o600)
    atomic_write_json(directory / DELEGATION_FILE, delegation)
    return key_path


def redelegate(directory: Path, fleet_keys: Sequence[Any], *, days: int = DEFAULT_ONLINE_DAYS) -> bool:
    """Sign the existing online key's delegation again with the keys of a new root (after `keys rotate`).

    Devices check the delegation against their current root, threshold included: without this, a
    rotation that drops the old fleet key would leave every command signed by an undelegated key.
    False when the folder holds no online key.
    """
    from nacl.signing import SigningKey

    from edgefleet.sdk.trust.keys import sign

    key_path = directory / ONLINE_KEY_FILE
    if not key_path.is_file():
        return False
    seed = base64.b64decode(key_path.read_bytes().strip(), validate=True)
    online = {
        "schema": DELEGATION_SCHEMA,
        "public": base64.b64encode(bytes(SigningKey(seed).verify_key)).decode("ascii"),
        "expires": int(time.time() + days * 86400),
    }
    signatures = [sign(delegation_bytes(online), key) for key in fleet_keys]
    atomic_write_json(directory / DELEGATION_FILE, {"online": online, "signatures": signatures})
    return True


class CommandSigner:
    """Signs command payloads for one device each: online key, delegation, a monotonic counter, an expiry."""

    def __init__(self, seed: bytes, delegation: dict[str, Any], ttl_s: float = 3600.0) -> None:
        self.seed = seed
        self.delegation = delegation
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._last = 0

    @classmethod
    def load(cls, directory: Optional[PathLike] = None) -> Optional[CommandSigner]:
        """The signer from a key folder (default: the fleet key's), or None when it holds no online key."""
        from edgefleet.sdk.trust.keys import default_key_dir

        folder = Path(directory) if directory is not None else default_key_dir()
        key_path = folder / ONLINE_KEY_FILE
        if not key_path.is_file():
            return None
        try:
            seed = base64.b64decode(key_path.read_bytes().strip(), validate=True)
        except ValueError:
            raise CommandKeyError(
                f"{key_path} is not an online key; re-create it (`edgefleet keys online`)"
            ) from None
        delegation = read_json(folder / DELEGATION_FILE)
        if len(seed) != 32 or not isinstance(delegation, dict):
            raise CommandKeyError(f"{key_path} or its {DELEGATION_FILE} is damaged; re-create them")
        return cls(seed, delegation)

    def counter(self) -> int:
        """The next counter: milliseconds since the epoch, strictly increasing in this process.

        A clock counter needs no host-side state and keeps increasing across host restarts; two host
        processes commanding one device in the same millisecond would see one command refused as a replay.
        """
        with self._lock:
            self._last = max(self._last + 1, int(time.time() * 1000))
            return self._last

    def sign(self, payload: bytes, device: str) -> bytes:
        """The command's wire bytes with its `auth` object for `device`."""
        return sign_command(
            payload,
            self.seed,
            device,
            self.counter(),
            expires=time.time() + self.ttl_s,
            delegation=self.delegation,
        )


def signed_payload(signer: Optional[CommandSigner], payload: bytes, device: str) -> bytes:
    """`payload` signed for `device` when there is a signer and it is not signed already."""
    if signer is None:
        return payload
    try:
        if "auth" in json.loads(payload):
            return payload
    except ValueError:
        return payload
    return signer.sign(payload, device)


_CACHE: dict[tuple[str, float], Optional[CommandSigner]] = {}
_CACHE_LOCK = threading.Lock()
_WARNED: set[str] = set()  # fleets already warned about unsigned commands
# fleet -> the key folders of its trusted fleet keys that hold an online key (use_command_keys).
_FOLDERS: dict[str, list[Path]] = {}


def use_command_keys(fleet: str, trusted_keys: Sequence[PathLike]) -> list[Path]:
    """Sign `fleet`'s commands with the online key beside one of its trusted fleet keys; the folders found.

    `edgefleet keys init --out DIR` writes `fleet.pub` and `online.key` into DIR, so a host that trusts
    DIR/fleet.pub signs with DIR/online.key. Without a call the default key folder is used; a call that
    finds no online key changes nothing. Fleet calls this with its `trusted_keys`; after a rotation to a
    new key, call it with the new key (or `redelegate` the online key to the new root).
    """
    folders = [Path(k).parent for k in trusted_keys if (Path(k).parent / ONLINE_KEY_FILE).is_file()]
    if folders:  # none found: an earlier choice for this fleet (or the default folder) stays
        with _CACHE_LOCK:
            _FOLDERS[fleet] = folders
    return folders


def command_key_dir(fleet: str) -> Path:
    """Where the online key that signs `fleet`'s commands lies.

    Its registered folder (`use_command_keys`), else `$EDGEFLEET_COMMAND_KEYS` (for host commands given
    no trusted key, e.g. `edgefleet rollout --resume/--abort`), else the default key folder.
    """
    from edgefleet.sdk.trust.keys import default_key_dir

    with _CACHE_LOCK:
        folders = list(_FOLDERS.get(fleet, ()))
    if folders:
        return folders[0]
    env = os.environ.get(COMMAND_KEYS_ENV)
    return Path(env).expanduser() if env else default_key_dir()


def sign_for_topic(topic: str, payload: bytes) -> bytes:
    """Sign a payload published on a device's `cmd` topic with the host's online key, when it has one.

    Every host sender (rollouts, registry, key rotation, federated rounds) publishes through
    `Connection.publish`, which calls this: one place signs every command. The key is read from the
    fleet's folder (`command_key_dir`: beside its trusted fleet key, else `$EDGEFLEET_HOME/keys`), again
    whenever its file changes. Without an online key the command goes unsigned, and agents refuse it
    with `command-unsigned` unless configured `require_signed_commands = false`.
    """
    from edgefleet.agent.core.topics import TopicKind, Topics

    parsed = Topics.parse(topic)
    if parsed is None or parsed.kind != TopicKind.CMD:
        return payload
    device = parsed.device
    folder = command_key_dir(parsed.fleet)
    try:
        stamp = (folder / ONLINE_KEY_FILE).stat().st_mtime
    except OSError:
        if parsed.fleet not in _WARNED:
            _WARNED.add(parsed.fleet)
            log.warning(
                "commands for fleet %s go unsigned: no %s in %s; agents refuse them (command-unsigned). "
                "Run `edgefleet keys online` there, or pass the fleet key's folder (Fleet trusted_keys)",
                parsed.fleet,
                ONLINE_KEY_FILE,
                folder,
            )
        return payload
    with _CACHE_LOCK:
        key = (str(folder), stamp)
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = CommandSigner.load(folder)
        signer = _CACHE[key]
    return signed_payload(signer, payload, device) if device else payload
