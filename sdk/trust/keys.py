"""The fleet's signing keys on the host: Ed25519 key pairs, signing, and root rotation statements.

Keys are made and used with the `cryptography` library (PKCS8 PEM, optionally passphrase-encrypted);
devices verify the same signatures with PyNaCl.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import atomic_write_bytes, atomic_write_json, read_json
from edgefleet.agent.core.manifest import canonical_bytes
from edgefleet.agent.core.paths import edgefleet_home
from edgefleet.agent.core.trust import (
    ROOT_FILE,
    TrustStore,
    key_id,
    load_public_key_pem,
    make_root,
    public_key_pem,
)
from edgefleet.sdk.errors import EdgefleetError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PRIVATE_KEY_FILE = "fleet.key"
PUBLIC_KEY_FILE = "fleet.pub"
PASSPHRASE_ENV = "EDGEFLEET_KEY_PASSPHRASE"
PathLike = Union[str, "os.PathLike[str]"]


class KeysError(EdgefleetError):
    """A key could not be made, read or used; `code` is stable, the message says what to do."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


def default_key_dir() -> Path:
    """Where `keys init` writes and `build` reads the fleet key by default."""
    return edgefleet_home() / "keys"


@dataclass(frozen=True)
class KeyPair:
    """Where a fleet key pair lives and its public identity."""

    private_path: Path
    public_path: Path
    keyid: str
    public_pem: str
    encrypted: bool


def public_raw(key: Ed25519PrivateKey) -> bytes:
    """The 32 raw public key bytes of a private key."""
    from cryptography.hazmat.primitives import serialization

    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def init_keys(
    directory: Optional[PathLike] = None, passphrase: Optional[str] = None, force: bool = False
) -> KeyPair:
    """Create the fleet's Ed25519 key pair (fleet.key 0600, fleet.pub), its version-1 root and the online command key.

    Never overwrites unless `force`.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    target = Path(directory) if directory is not None else default_key_dir()
    private_path, public_path = target / PRIVATE_KEY_FILE, target / PUBLIC_KEY_FILE
    if not force and (private_path.exists() or public_path.exists()):
        raise KeysError(
            "keys-exist",
            f"{private_path} already exists; devices trust that key, so replacing it would lock them out. "
            "Use `edgefleet keys rotate` to change keys, or pass --force to overwrite",
        )
    if passphrase == "":
        raise KeysError("passphrase-empty", "the passphrase is empty; give a real one or none at all")
    target.mkdir(parents=True, exist_ok=True)
    os.chmod(target, 0o700)
    key = Ed25519PrivateKey.generate()
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase.encode("utf-8"))
        if passphrase
        else serialization.NoEncryption()
    )
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    raw = public_raw(key)
    atomic_write_bytes(private_path, private_pem, mode=0o600)
    atomic_write_bytes(public_path, public_key_pem(raw), mode=0o644)
    # The host's copy of the fleet's root, version 1: the base that `keys rotate` builds on.
    root = make_root([raw])
    atomic_write_json(target / ROOT_FILE, {"root": root, "signatures": [sign(canonical_bytes(root), key)]})
    # The online key that signs commands (the director role), delegated by this offline key.
    from edgefleet.sdk.trust.command_signing import init_online_key

    init_online_key(target, key, force=True)
    return KeyPair(
        private_path, public_path, key_id(raw), public_key_pem(raw).decode("ascii"), bool(passphrase)
    )


def load_private_key(path: Optional[PathLike] = None, passphrase: Optional[str] = None) -> Ed25519PrivateKey:
    """Read a PKCS8 PEM Ed25519 private key; an encrypted key takes `passphrase` or `$EDGEFLEET_KEY_PASSPHRASE`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path = Path(path) if path is not None else default_key_dir() / PRIVATE_KEY_FILE
    try:
        data = key_path.read_bytes()
    except FileNotFoundError:
        raise KeysError(
            "key-missing", f"no signing key at {key_path}; create one with `edgefleet keys init`"
        ) from None
    secret = passphrase if passphrase is not None else os.environ.get(PASSPHRASE_ENV)
    try:
        key = serialization.load_pem_private_key(data, password=secret.encode("utf-8") if secret else None)
    except TypeError:
        raise KeysError(
            "passphrase-required",
            f"{key_path} is encrypted; give its passphrase (--passphrase-env VAR or ${PASSPHRASE_ENV})",
        ) from None
    except ValueError:
        raise KeysError(
            "key-unreadable",
            f"{key_path} could not be read: wrong passphrase, or not a PEM private key from `edgefleet keys init`",
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError("key-unreadable", f"{key_path} is not an Ed25519 key; edgefleet signs with Ed25519")
    return key


def sign(data: bytes, key: Ed25519PrivateKey) -> dict[str, str]:
    """Sign bytes; returns one entry of a signature document: {"keyid", "sig" (base64), "sha256"}."""
    # sha256 of the signed bytes: lets a verifier tell bytes edited after signing from a forged signature.
    return {
        "keyid": key_id(public_raw(key)),
        "sig": base64.b64encode(key.sign(data)).decode("ascii"),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def load_host_root(directory: Optional[PathLike] = None) -> dict[str, Any]:
    """The host's copy of the fleet's current root document (written by `keys init`, advanced by `keys rotate`)."""
    path = (Path(directory) if directory is not None else default_key_dir()) / ROOT_FILE
    stored = read_json(path)
    if not isinstance(stored, dict) or not isinstance(stored.get("root"), dict):
        raise KeysError(
            "root-missing", f"no fleet root at {path}; create the fleet key with `edgefleet keys init`"
        )
    root: dict[str, Any] = stored["root"]
    return root


def make_rotation(
    current_root: dict[str, Any],
    new_public_keys: Sequence[PathLike | bytes],
    signing_keys: Sequence[Ed25519PrivateKey],
    *,
    threshold: int = 1,
    bundle_threshold: int = 1,
    expires: Optional[datetime] = None,
) -> dict[str, Any]:
    """Make the statement that moves the fleet to root version n+1 with `new_public_keys`.

    `signing_keys` must hold enough keys of the current root (its threshold) and of the new one (the
    new threshold); the statement is checked the way a device checks it before it is returned.
    """
    raws = [
        load_public_key_pem(p) if not isinstance(p, bytes) or p.startswith(b"-----") else p
        for p in new_public_keys
    ]
    try:
        current = TrustStore(current_root)
        doc = make_root(
            raws,
            version=current.version + 1,
            threshold=threshold,
            bundle_threshold=bundle_threshold,
            expires=expires or datetime.now(timezone.utc) + timedelta(days=365),
        )
    except VerifyError as exc:
        raise KeysError(exc.code, exc.reason) from None
    doc_bytes = canonical_bytes(doc)
    sigs = {"signatures": [sign(doc_bytes, k) for k in signing_keys]}
    try:
        current.apply_root(doc_bytes, sigs)
    except VerifyError as exc:
        raise KeysError(
            exc.code,
            f"devices would refuse this rotation: {exc.reason}. Sign with more keys (--sign-with KEY, "
            "including the new key)",
        ) from None
    return {"root": doc, "signatures": sigs["signatures"]}


def save_rotation(
    statement: dict[str, Any], out_path: PathLike, directory: Optional[PathLike] = None
) -> None:
    """Write a rotation statement to `out_path` and make it the host's current root."""
    atomic_write_json(out_path, statement)
    target = Path(directory) if directory is not None else default_key_dir()
    atomic_write_json(target / ROOT_FILE, statement)
