"""The fleet's chain of trust on the device: a TUF-like root of Ed25519 keys, threshold checks, rotation.

The device verifies with PyNaCl (libsodium) rather than `cryptography`, which is too large for the
agent's disk budget. Ed25519 is deterministic and standard, so signatures made on the host with
`cryptography` verify here byte for byte.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import atomic_write_json, read_json
from edgefleet.agent.core.manifest import canonical_bytes, format_time, parse_time

ROOT_SCHEMA = "edgefleet.root/1"
ROOT_FILE = "root.json"
# DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410): SEQUENCE { SEQUENCE { OID 1.3.101.112 },
# BIT STRING (33 bytes, 0 unused bits) }. Comparing it is a format check, not cryptography; the key
# itself is then handed to libsodium.
ED25519_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
MAX_ROOT_BYTES = 1024 * 1024
MAX_SIGNATURES_BYTES = 64 * 1024
MAX_SIGNATURES = 64
_PEM_BEGIN = "-----BEGIN PUBLIC KEY-----"
_PEM_END = "-----END PUBLIC KEY-----"

KeySource = Union[str, "os.PathLike[str]", bytes]


def key_id(raw: bytes) -> str:
    """The key id: hex sha256 of the 32 raw Ed25519 public key bytes."""
    return hashlib.sha256(raw).hexdigest()


def load_public_key_pem(source: KeySource) -> bytes:
    """Read a PEM SubjectPublicKeyInfo Ed25519 public key (a path or the PEM bytes); return 32 raw bytes."""
    if isinstance(source, bytes):
        text, where = source.decode("ascii", errors="replace"), "the given PEM"
    else:
        where = os.fspath(source)
        try:
            with open(where, "rb") as handle:
                text = handle.read(16 * 1024).decode("ascii", errors="replace")
        except FileNotFoundError:
            raise VerifyError(
                "key-invalid",
                f"public key file {where} does not exist; copy the fleet's fleet.pub "
                "(made by `edgefleet keys init`) to the device",
            ) from None
    begin, end = text.find(_PEM_BEGIN), text.find(_PEM_END)
    if begin < 0 or end < begin:
        raise VerifyError(
            "key-invalid", f"{where} is not a PEM public key; use the fleet.pub made by `edgefleet keys init`"
        )
    body = "".join(text[begin + len(_PEM_BEGIN) : end].split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise VerifyError("key-invalid", f"{where} has a corrupt base64 body") from None
    if len(der) != len(ED25519_SPKI_PREFIX) + 32 or not der.startswith(ED25519_SPKI_PREFIX):
        raise VerifyError(
            "key-invalid",
            f"{where} is not an Ed25519 public key; edgefleet signs with Ed25519 (`edgefleet keys init`)",
        )
    return der[len(ED25519_SPKI_PREFIX) :]


def public_key_pem(raw: bytes) -> bytes:
    """Encode 32 raw Ed25519 public key bytes as a PEM SubjectPublicKeyInfo."""
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    body = base64.b64encode(ED25519_SPKI_PREFIX + raw).decode("ascii")
    return f"{_PEM_BEGIN}\n{body}\n{_PEM_END}\n".encode("ascii")


def _verify_one(raw_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when `signature` is a valid Ed25519 signature of `data` by `raw_key`."""
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    try:
        VerifyKey(raw_key).verify(data, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def parse_signatures(doc: Union[bytes, Mapping[str, Any]]) -> List[Dict[str, str]]:
    """Validate a `{"signatures": [{"keyid", "sig"}]}` document (bytes bounded to 64 KiB)."""
    if isinstance(doc, (bytes, bytearray)):
        if len(doc) > MAX_SIGNATURES_BYTES:
            raise VerifyError(
                "signatures-invalid", f"the signature document is over {MAX_SIGNATURES_BYTES} bytes"
            )
        try:
            doc = json.loads(bytes(doc).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise VerifyError("signatures-invalid", "the signature document is not JSON") from None
    sigs = doc.get("signatures") if isinstance(doc, Mapping) else None
    if not isinstance(sigs, list) or len(sigs) > MAX_SIGNATURES:
        raise VerifyError(
            "signatures-invalid",
            f'the signature document must be {{"signatures": [{{"keyid": ..., "sig": ...}}]}} '
            f"with at most {MAX_SIGNATURES} entries",
        )
    out: List[Dict[str, str]] = []
    for entry in sigs:
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("keyid"), str)
            or not isinstance(entry.get("sig"), str)
        ):
            raise VerifyError("signatures-invalid", 'each signature needs string "keyid" and "sig" fields')
        kept = {"keyid": entry["keyid"], "sig": entry["sig"]}
        if isinstance(entry.get("sha256"), str):
            kept["sha256"] = entry["sha256"]  # what the signer says it signed (diagnostics only)
        out.append(kept)
    return out


def _check_root_doc(doc: Any) -> Dict[str, bytes]:
    """Validate a root document's shape; return its keys as keyid → raw bytes."""
    if not isinstance(doc, dict) or doc.get("schema") != ROOT_SCHEMA:
        raise VerifyError(
            "root-invalid", f"a root document must be a JSON object with schema {ROOT_SCHEMA!r}"
        )
    version: Any = doc.get("version")
    threshold: Any = doc.get("threshold")
    bundle_threshold: Any = doc.get("bundle_threshold", 1)
    for name, value in (
        ("version", version),
        ("threshold", threshold),
        ("bundle_threshold", bundle_threshold),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise VerifyError("root-invalid", f"root field `{name}` must be an integer >= 1")
    keys_obj = doc.get("keys")
    if not isinstance(keys_obj, dict) or not keys_obj:
        raise VerifyError("root-invalid", "root field `keys` must map key ids to Ed25519 public keys")
    keys: Dict[str, bytes] = {}
    for kid, spec in keys_obj.items():
        if (
            not isinstance(spec, dict)
            or spec.get("type") != "ed25519"
            or not isinstance(spec.get("public"), str)
        ):
            raise VerifyError(
                "root-invalid", f"root key {kid} must be {{'type': 'ed25519', 'public': base64}}"
            )
        try:
            raw = base64.b64decode(spec["public"], validate=True)
        except (binascii.Error, ValueError):
            raise VerifyError("root-invalid", f"root key {kid} has corrupt base64") from None
        if len(raw) != 32 or key_id(raw) != kid:
            raise VerifyError(
                "root-invalid", f"root key {kid}: the id is not sha256 of its 32-byte public key"
            )
        keys[kid] = raw
    if threshold > len(keys) or bundle_threshold > len(keys):
        raise VerifyError(
            "root-invalid", f"root thresholds ({threshold}, {bundle_threshold}) exceed its {len(keys)} keys"
        )
    expires = doc.get("expires")
    if expires is not None:
        try:
            parse_time(expires, "expires")
        except VerifyError:
            raise VerifyError("root-invalid", "root field `expires` must be ISO-8601 UTC or null") from None
    return keys


def make_root(
    public_keys: Sequence[bytes],
    *,
    version: int = 1,
    threshold: int = 1,
    bundle_threshold: int = 1,
    expires: Optional[datetime] = None,
) -> Dict[str, Any]:
    """Build a root document from raw public keys (the host signs it for a rotation)."""
    doc: Dict[str, Any] = {
        "schema": ROOT_SCHEMA,
        "version": version,
        "threshold": threshold,
        "bundle_threshold": bundle_threshold,
        "keys": {
            key_id(raw): {"type": "ed25519", "public": base64.b64encode(raw).decode("ascii")}
            for raw in public_keys
        },
        "expires": None if expires is None else format_time(expires),
    }
    _check_root_doc(doc)
    return doc


class TrustStore:
    """The device's current root: which keys are trusted and how many signatures a bundle or rotation needs."""

    def __init__(
        self, root: Mapping[str, Any], state_dir: Optional[Union[str, os.PathLike[str]]] = None
    ) -> None:
        self._keys = _check_root_doc(dict(root))
        self.root: Dict[str, Any] = json.loads(canonical_bytes(dict(root)))
        self.state_dir = None if state_dir is None else Path(state_dir)
        # The signatures that admitted this root (empty for a root built from local key files), kept for audit.
        self.signatures: List[Dict[str, str]] = []

    @property
    def version(self) -> int:
        """The root's version; each rotation increments it by one."""
        return int(self.root["version"])

    @property
    def threshold(self) -> int:
        """Signatures by current keys a rotation needs."""
        return int(self.root["threshold"])

    @property
    def bundle_threshold(self) -> int:
        """Signatures by current keys a bundle manifest needs."""
        return int(self.root.get("bundle_threshold", 1))

    @property
    def keyids(self) -> List[str]:
        """Ids of the trusted keys, sorted."""
        return sorted(self._keys)

    def public_key(self, keyid: str) -> bytes:
        """Raw bytes of one trusted key."""
        return self._keys[keyid]

    @classmethod
    def from_public_keys(
        cls,
        paths: Iterable[KeySource],
        threshold: int = 1,
        *,
        bundle_threshold: int = 1,
        state_dir: Optional[Union[str, os.PathLike[str]]] = None,
    ) -> TrustStore:
        """A version-1 root from `--trusted-key` .pub files (or PEM bytes); no expiry, it is local config."""
        raws = [load_public_key_pem(p) for p in paths]
        if not raws:
            raise VerifyError("key-invalid", "no trusted public key given; pass --trusted-key PATH/fleet.pub")
        unique = list({key_id(r): r for r in raws}.values())
        if threshold < 1 or threshold > len(unique) or bundle_threshold < 1 or bundle_threshold > len(unique):
            raise VerifyError(
                "root-invalid",
                f"thresholds ({threshold}, {bundle_threshold}) must be between 1 and the "
                f"{len(unique)} distinct trusted keys given",
            )
        doc = make_root(unique, threshold=threshold, bundle_threshold=bundle_threshold)
        return cls(doc, state_dir)

    @classmethod
    def load(cls, state_dir: Union[str, os.PathLike[str]]) -> Optional[TrustStore]:
        """The root persisted in `state_dir`, or None when the device has none yet."""
        stored = read_json(Path(state_dir) / ROOT_FILE)
        if stored is None:
            return None
        if not isinstance(stored, dict) or "root" not in stored:
            raise VerifyError(
                "root-invalid", f"{Path(state_dir) / ROOT_FILE} is corrupt; remove it and restart"
            )
        store = cls(stored["root"], state_dir)
        store.signatures = parse_signatures({"signatures": stored.get("signatures", [])})
        return store

    @classmethod
    def open(
        cls,
        state_dir: Union[str, os.PathLike[str]],
        trusted_keys: Iterable[KeySource],
        threshold: int = 1,
        *,
        bundle_threshold: int = 1,
    ) -> TrustStore:
        """Load the persisted root; on first start build it from the trusted keys and persist it.

        Once a root exists it wins over the `--trusted-key` files, because a rotation may have removed
        a key those files still name.
        """
        existing = cls.load(state_dir)
        if existing is not None:
            return existing
        store = cls.from_public_keys(
            trusted_keys, threshold, bundle_threshold=bundle_threshold, state_dir=state_dir
        )
        store.persist()
        return store

    def persist(self, state_dir: Optional[Union[str, os.PathLike[str]]] = None) -> None:
        """Write the current root atomically into the state dir."""
        target = Path(state_dir) if state_dir is not None else self.state_dir
        if target is None:
            raise ValueError("TrustStore.persist needs a state_dir")
        self.state_dir = target
        atomic_write_json(target / ROOT_FILE, {"root": self.root, "signatures": self.signatures})

    def verify_signatures(
        self,
        data: bytes,
        signatures_doc: Union[bytes, Mapping[str, Any]],
        threshold: Optional[int] = None,
    ) -> List[str]:
        """Check that ≥ threshold distinct trusted keys signed `data`; return their ids.

        Codes: `unsigned` (no signature), `bad-signature` (a trusted key's signature does not match,
        i.e. the data changed after signing), `untrusted-key` (only unknown keys signed),
        `threshold-not-met` (too few distinct trusted signatures).
        """
        needed = self.bundle_threshold if threshold is None else threshold
        return _count_signatures(self._keys, data, parse_signatures(signatures_doc), needed)

    def apply_root(
        self,
        doc_bytes: bytes,
        signatures: Union[bytes, Mapping[str, Any]],
        *,
        now: Optional[datetime] = None,
    ) -> int:
        """Rotate to root version n+1, signed by the old root's threshold and its own; persist; return n+1.

        Nothing changes on any failure: the new root is checked completely before it replaces the old.
        """
        if len(doc_bytes) > MAX_ROOT_BYTES:
            raise VerifyError("root-invalid", f"the root document is over {MAX_ROOT_BYTES} bytes")
        try:
            doc = json.loads(doc_bytes.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise VerifyError("root-invalid", "the root document is not UTF-8 JSON") from None
        if canonical_bytes(doc) != doc_bytes:
            raise VerifyError(
                "root-invalid",
                "the root document is not in canonical form; make it with `edgefleet keys rotate`",
            )
        new_keys = _check_root_doc(doc)
        if doc["version"] != self.version + 1:
            raise VerifyError(
                "root-version",
                f"the new root has version {doc['version']}, but this device is at root version "
                f"{self.version}; apply rotations in order, each exactly one version newer",
            )
        moment = now or datetime.now(timezone.utc)
        if doc.get("expires") is not None and parse_time(doc["expires"], "expires") <= moment:
            raise VerifyError(
                "root-expired", f"the new root expired at {doc['expires']}; make a fresh rotation"
            )
        sigs = parse_signatures(signatures)
        for keys, needed, which in (
            (self._keys, self.threshold, f"the current root (version {self.version})"),
            (new_keys, int(doc["threshold"]), f"the new root (version {doc['version']})"),
        ):
            try:
                _count_signatures(keys, doc_bytes, sigs, needed)
            except VerifyError as exc:
                raise VerifyError(
                    "rotation-threshold-not-met",
                    f"the key rotation needs {needed} valid signature(s) by keys of {which}: {exc.reason}",
                ) from None
        previous = self.root, self._keys, self.signatures
        self.root, self._keys, self.signatures = doc, new_keys, sigs
        if self.state_dir is not None:
            try:
                self.persist()
            except OSError:
                self.root, self._keys, self.signatures = previous
                raise
        return self.version


def load_rotation(data: bytes) -> tuple[bytes, Dict[str, List[Dict[str, str]]]]:
    """Split a rotation statement `{"root": {...}, "signatures": [...]}` into (canonical root bytes, signature document) for `apply_root`."""
    if len(data) > MAX_ROOT_BYTES + MAX_SIGNATURES_BYTES:
        raise VerifyError("root-invalid", "the rotation statement is too large")
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise VerifyError("root-invalid", "the rotation statement is not UTF-8 JSON") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("root"), dict):
        raise VerifyError(
            "root-invalid",
            'a rotation statement is {"root": {...}, "signatures": [...]} from `edgefleet keys rotate`',
        )
    return canonical_bytes(obj["root"]), {"signatures": parse_signatures(obj)}


def _count_signatures(
    keys: Mapping[str, bytes], data: bytes, sigs: Sequence[Mapping[str, str]], needed: int
) -> List[str]:
    """Distinct key ids among `keys` with a valid signature over `data`; raise if fewer than `needed`."""
    valid: List[str] = []
    bad: List[str] = []
    untrusted: List[str] = []
    for entry in sigs:
        kid = entry["keyid"]
        if kid not in keys:
            untrusted.append(kid)
            continue
        try:
            sig = base64.b64decode(entry["sig"], validate=True)
        except (binascii.Error, ValueError):
            bad.append(kid)
            continue
        if _verify_one(keys[kid], data, sig):
            if kid not in valid:
                valid.append(kid)
        else:
            bad.append(kid)
    if len(valid) >= needed:
        return valid
    if not sigs:
        raise VerifyError(
            "unsigned", "there is no signature; sign with the fleet key (`edgefleet keys init`)"
        )
    if bad:
        raise VerifyError(
            "bad-signature",
            f"the signature of trusted key {bad[0][:16]}… does not match the signed bytes: "
            "they were changed after signing",
        )
    if not valid:
        raise VerifyError(
            "untrusted-key",
            f"signed only by key(s) {', '.join(k[:16] + '…' for k in untrusted)} that this device does not "
            "trust; sign with the fleet key or rotate the new key in with `edgefleet keys rotate`",
        )
    raise VerifyError(
        "threshold-not-met",
        f"{len(valid)} valid signature(s) by distinct trusted keys, {needed} needed",
    )
