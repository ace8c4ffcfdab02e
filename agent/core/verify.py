"""Bundle verification on the device: bounded reads, signatures by trusted keys, hashes, expiry, target, version.

The order matters: sizes are checked before anything is read, the signature is checked over the raw
manifest bytes before the parser sees them, and file contents are streamed, never buffered whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, BinaryIO, Dict, Mapping, Optional, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.ledger import VersionLedger
from edgefleet.agent.core.manifest import (
    MANIFEST_FILE,
    MAX_MANIFEST_BYTES,
    SIGNATURE_FILE,
    FileEntry,
    Manifest,
    canonical_bytes,
)
from edgefleet.agent.core.trust import MAX_SIGNATURES_BYTES, TrustStore, parse_signatures

CHUNK = 1024 * 1024

# One distinct code per failure, so an operator (and a test) can tell the attacks apart.
ERROR_CODES: Dict[str, str] = {
    "manifest-too-large": "manifest.json is over 1 MiB; it is corrupt or hostile (endless data)",
    "manifest-invalid": "manifest.json is not valid JSON or a field has the wrong type; the message names it",
    "manifest-not-canonical": "manifest.json is not stored as canonical JSON; rebuild the bundle with edgefleet",
    "schema-unsupported": "the manifest schema is newer or other than this agent reads; upgrade the agent",
    "signatures-invalid": "signature.json is malformed or over 64 KiB",
    "unsigned": "the bundle carries no signature",
    "manifest-edited": "a trusted key's signature does not match manifest.json: it was edited after signing",
    "bad-signature": "a signature labelled with a trusted key's id is forged or damaged (not made by that key)",
    "untrusted-key": "signed only by keys this device does not trust (arbitrary software)",
    "threshold-not-met": "fewer valid signatures by distinct trusted keys than the root requires",
    "manifest-expired": "the manifest's expiry has passed (indefinite freeze); build and sign a fresh bundle",
    "wrong-profile": "the bundle targets another device profile (mix-and-match)",
    "wrong-device": "the bundle lists device ids and this device is not one of them",
    "version-rollback": "the version is older than the one installed (rollback attack)",
    "version-not-newer": "the version equals the one installed; versions must strictly increase",
    "file-missing": "a file the manifest lists is not in the bundle",
    "file-unlisted": "the bundle holds a file the manifest does not list (file added)",
    "file-not-regular": "a bundle entry is a link, device or other non-regular file",
    "file-too-large": "a file is declared larger than the profile's maximum model size; refused before reading",
    "file-too-long": "a file is longer than its declared size; the stream was cut off at the declared size",
    "file-truncated": "a file is shorter than its declared size",
    "file-hash-mismatch": "a file's sha256 differs from the manifest (modified content)",
    "key-invalid": "a public key file is not an Ed25519 PEM public key",
    "root-invalid": "a root (trust) document is malformed or not canonical",
    "root-version": "a key rotation is not exactly one root version newer than the current one",
    "root-expired": "a key rotation's new root has already expired",
    "rotation-threshold-not-met": "a key rotation lacks enough valid signatures by old or new root keys",
    "ledger-corrupt": "the agent's version ledger is damaged; restore it",
}


def _fail(code: str, reason: str) -> VerifyError:
    return VerifyError(code, reason)


def _signature_failure(
    manifest_bytes: bytes, signatures_doc: Union[bytes, Mapping[str, Any]], exc: VerifyError
) -> VerifyError:
    """`manifest-edited` when a signature names other bytes than these; `bad-signature` otherwise.

    Ed25519 cannot say why a signature fails, so the signer's `sha256` of what it signed decides: a digest
    that differs means the manifest changed after signing; a matching or missing one means the signature
    itself is forged or corrupt (e.g. made by another key but labelled with the fleet key's id). The
    digest is unsigned: it only picks the code of a refusal, never whether to refuse.
    """
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    try:
        entries = parse_signatures(signatures_doc)
    except VerifyError:
        entries = []
    if any(e.get("sha256") not in (None, digest) for e in entries):
        return _fail(
            "manifest-edited",
            f"manifest.json was changed after it was signed ({exc.reason}); re-sign it with "
            "`edgefleet build` or use the original bundle",
        )
    return _fail(
        "bad-signature",
        f"{exc.reason}; the signature is forged or damaged (or manifest.json was edited after signing); "
        "use the original bundle or sign it again with the fleet key",
    )


def verify_manifest(
    manifest_bytes: bytes,
    signatures_doc: Union[bytes, Mapping[str, Any]],
    trust: TrustStore,
    *,
    profile: str,
    device_id: Optional[str],
    ledger: Optional[VersionLedger],
    now: Optional[datetime] = None,
) -> Manifest:
    """Verify signed manifest bytes for this device and return the parsed Manifest.

    `device_id=None` skips the device-id check (the host verifying an upload); `ledger=None` skips the
    version check. Raises VerifyError with a code from ERROR_CODES.
    """
    if len(manifest_bytes) > MAX_MANIFEST_BYTES:
        raise _fail(
            "manifest-too-large",
            f"manifest.json is {len(manifest_bytes)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit",
        )
    # Signature first, over the raw bytes: the JSON parser only ever sees bytes a trusted key signed.
    try:
        trust.verify_signatures(manifest_bytes, signatures_doc)
    except VerifyError as exc:
        if exc.code == "bad-signature":
            raise _signature_failure(manifest_bytes, signatures_doc, exc) from None
        raise
    manifest = Manifest.from_bytes(manifest_bytes)
    if canonical_bytes(json.loads(manifest_bytes.decode("utf-8"))) != manifest_bytes:
        raise _fail(
            "manifest-not-canonical", "manifest.json is not canonical JSON; rebuild the bundle with edgefleet"
        )
    moment = now or datetime.now(timezone.utc)
    if manifest.expires_at <= moment:
        raise _fail(
            "manifest-expired",
            f"{manifest.name} v{manifest.version} expired at {manifest.expires}; build and sign a fresh "
            "bundle (check the device clock if this looks wrong)",
        )
    if manifest.target.profile != profile:
        raise _fail(
            "wrong-profile",
            f"{manifest.name} v{manifest.version} was built for profile {manifest.target.profile!r}, this "
            f"device is {profile!r}; build for {profile!r} with `edgefleet build --profile {profile}`",
        )
    if device_id is not None and manifest.target.device_ids and device_id not in manifest.target.device_ids:
        raise _fail(
            "wrong-device",
            f"{manifest.name} v{manifest.version} is meant for devices {', '.join(manifest.target.device_ids)}, "
            f"not {device_id!r}",
        )
    if ledger is not None:
        last = ledger.last(manifest.name)
        if last is not None and manifest.version < last:
            raise _fail(
                "version-rollback",
                f"{manifest.name} v{manifest.version} is older than v{last} already installed; "
                "an old signed bundle is being replayed, or build a new version",
            )
        if last is not None and manifest.version == last:
            raise _fail(
                "version-not-newer",
                f"{manifest.name} v{manifest.version} is already installed; build a newer version to update",
            )
    return manifest


def _hash_stream(src: IO[bytes], limit: int, sink: Optional[BinaryIO] = None) -> tuple[str, int, bool]:
    """Read at most `limit` bytes (+1 probe byte); return (sha256, bytes read, whether more followed)."""
    digest = hashlib.sha256()
    remaining = limit
    total = 0
    while remaining > 0:
        block = src.read(min(CHUNK, remaining))
        if not block:
            break
        digest.update(block)
        if sink is not None:
            sink.write(block)
        total += len(block)
        remaining -= len(block)
    more = bool(src.read(1)) if remaining == 0 else False
    return digest.hexdigest(), total, more


def _check_declared(relpath: str, declared: int, max_bytes: int) -> None:
    if declared > max_bytes:
        raise _fail(
            "file-too-large",
            f"{relpath} is declared as {declared} bytes, over this device's limit of {max_bytes} bytes; "
            "compress the model further or deploy to a bigger profile",
        )


def verify_file(path: Union[str, os.PathLike[str]], entry: FileEntry, max_bytes: int) -> None:
    """Check one file's size and sha256 against its manifest entry, streaming at most the declared size."""
    name = os.fspath(path)
    _check_declared(name, entry.size, max_bytes)
    try:
        info = os.lstat(name)
    except FileNotFoundError:
        raise _fail("file-missing", f"{name} is listed in the manifest but missing") from None
    if not stat.S_ISREG(info.st_mode):
        raise _fail("file-not-regular", f"{name} is not a regular file (a link or device); refusing it")
    if info.st_size > entry.size:
        raise _fail(
            "file-too-long",
            f"{name} is {info.st_size} bytes, longer than the {entry.size} bytes the manifest declares",
        )
    # O_NOFOLLOW closes the window where the file is swapped for a link between lstat and open.
    fd = os.open(name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        digest, total, more = _hash_stream(handle, entry.size)
    if more:
        raise _fail("file-too-long", f"{name} is longer than the {entry.size} bytes the manifest declares")
    if total < entry.size:
        raise _fail("file-truncated", f"{name} has {total} bytes, the manifest declares {entry.size}")
    if digest != entry.sha256:
        raise _fail(
            "file-hash-mismatch",
            f"{name} does not match its signed sha256 (got {digest[:16]}…, expected {entry.sha256[:16]}…): "
            "it was modified",
        )


def copy_bounded(
    src: IO[bytes], dst_path: Union[str, os.PathLike[str]], declared_size: int, max_bytes: int
) -> str:
    """Copy a stream into `dst_path`, never more than `declared_size` bytes; return the sha256 of what was copied.

    A stream longer than declared is cut off (file-too-long), a shorter one is refused (file-truncated);
    either way the partial file is removed.
    """
    target = os.fspath(dst_path)
    _check_declared(target, declared_size, max_bytes)
    try:
        with open(target, "wb") as sink:
            digest, total, more = _hash_stream(src, declared_size, sink)
            sink.flush()
            os.fsync(sink.fileno())
        if more:
            raise _fail(
                "file-too-long",
                f"the stream for {target} continues past its declared {declared_size} bytes; cut off",
            )
        if total < declared_size:
            raise _fail(
                "file-truncated", f"the stream for {target} ended at {total} of {declared_size} bytes"
            )
    except BaseException:
        try:
            os.unlink(target)
        except FileNotFoundError:
            pass
        raise
    return digest


def _read_bounded(path: Path, limit: int, too_large_code: str, what: str) -> bytes:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise _fail("file-missing", f"{path} is missing: {what} must be in every bundle") from None
    if not stat.S_ISREG(info.st_mode):
        raise _fail("file-not-regular", f"{path} is not a regular file; refusing it")
    if info.st_size > limit:
        raise _fail(too_large_code, f"{path} is {info.st_size} bytes, over the {limit}-byte limit for {what}")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(limit + 1)
    if len(data) > limit:
        raise _fail(too_large_code, f"{path} grew past the {limit}-byte limit for {what} while being read")
    return data


def _walk(root: Path) -> list[str]:
    """Every entry under `root` as a relative POSIX path; refuses anything but regular files and folders."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in list(dirnames) + filenames:
            full = Path(dirpath) / entry
            mode = os.lstat(full).st_mode
            rel = full.relative_to(root).as_posix()
            if stat.S_ISDIR(mode):
                continue
            if not stat.S_ISREG(mode):
                raise _fail(
                    "file-not-regular", f"{rel} in the bundle is a link or device; refusing the bundle"
                )
            found.append(rel)
    return found


def verify_bundle_dir(
    bundle_dir: Union[str, os.PathLike[str]],
    trust: TrustStore,
    *,
    profile: str,
    device_id: Optional[str],
    ledger: Optional[VersionLedger],
    max_model_bytes: int,
    now: Optional[datetime] = None,
) -> Manifest:
    """Verify a whole unpacked bundle folder: the signed manifest, then every file; no file unlisted or missing."""
    root = Path(bundle_dir)
    manifest_bytes = _read_bounded(
        root / MANIFEST_FILE, MAX_MANIFEST_BYTES, "manifest-too-large", "manifest.json"
    )
    signature_bytes = _read_bounded(
        root / SIGNATURE_FILE, MAX_SIGNATURES_BYTES, "signatures-invalid", "signature.json"
    )
    manifest = verify_manifest(
        manifest_bytes, signature_bytes, trust, profile=profile, device_id=device_id, ledger=ledger, now=now
    )
    present = set(_walk(root)) - {MANIFEST_FILE, SIGNATURE_FILE}
    extra = sorted(present - set(manifest.files))
    if extra:
        raise _fail(
            "file-unlisted",
            f"the bundle holds {', '.join(extra)}, which the signed manifest does not list; remove it",
        )
    missing = sorted(set(manifest.files) - present)
    if missing:
        raise _fail("file-missing", f"the bundle lacks {', '.join(missing)}, which the manifest lists")
    for relpath, entry in sorted(manifest.files.items()):
        verify_file(root / relpath, entry, max_model_bytes)
    return manifest
