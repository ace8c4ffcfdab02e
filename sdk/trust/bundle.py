"""Bundles on the host: create and sign a bundle folder, pack it to one `.tar`, unpack a `.tar` safely, inspect.

A bundle is written into a temporary sibling folder and renamed into place, so a half-written folder
never looks like a bundle. Unpacking refuses absolute paths, `..`, links and device files, and never
writes outside the target folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from edgefleet.agent.core.errors import VerifyError
from edgefleet.agent.core.fsutil import atomic_write_bytes, fsync_dir
from edgefleet.agent.core.manifest import (
    MANIFEST_FILE,
    REPORT_FILE,
    SCHEMA,
    SIGNATURE_FILE,
    Manifest,
    canonical_bytes,
    check_relpath,
    format_time,
)
from edgefleet.agent.core.verify import copy_bounded
from edgefleet.sdk.errors import EdgefleetError
from edgefleet.sdk.trust.keys import sign

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

PathLike = Union[str, "os.PathLike[str]"]
DEFAULT_EXPIRY_DAYS = 30
MAX_TAR_MEMBERS = 256
# Far above any model a device profile allows; it only stops a hostile tar from filling the disk.
DEFAULT_MAX_UNPACK_BYTES = 16 * 1024**3


# Codes of the host-side bundle operations; verification codes are in edgefleet.agent.core.verify.ERROR_CODES.
BUNDLE_ERROR_CODES: dict[str, str] = {
    "input-missing": "a model, eval or bundle path given does not exist",
    "manifest-invalid": "the manifest fields would not verify on a device; the message names the field",
    "manifest-not-canonical": "manifest.json was rewritten by hand; re-signing needs the canonical bytes",
    "output-not-bundle": "the output folder exists and holds something other than a bundle",
    "output-not-empty": "the unpack target folder is not empty",
    "not-a-bundle": "the folder has no manifest.json",
    "file-not-regular": "the bundle folder holds a link or device file",
    "tar-invalid": "the file is not a readable tar",
    "tar-absolute-path": "a tar entry has an absolute path (or an empty name)",
    "tar-parent-path": "a tar entry climbs out of the target with `..`",
    "tar-link": "a tar entry is a symbolic or hard link",
    "tar-special-file": "a tar entry is a device, FIFO or other special file",
    "tar-too-many-files": f"the tar has more than {MAX_TAR_MEMBERS} entries",
    "tar-too-large": "the tar's entries add up to more than the unpack limit",
    "tar-duplicate": "the tar holds the same file twice",
}


class BundleError(EdgefleetError):
    """A bundle could not be made, packed or unpacked; `code` is stable, the message says what to do."""

    def __init__(self, code: str, reason: str) -> None:
        self.code = code
        self.reason = reason
        super().__init__(f"[{code}] {reason}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def _fill_defaults(fields: Mapping[str, Any], model_name: str) -> dict[str, Any]:
    """Copy the caller's fields and fill schema, version, created, expires and file names."""
    obj = json.loads(json.dumps(dict(fields)))
    for section in ("model", "eval", "health"):
        if not isinstance(obj.get(section, {}), dict):
            raise BundleError("manifest-invalid", f"manifest field `{section}` must be an object (a dict)")
    now = datetime.now(timezone.utc)
    obj["schema"] = SCHEMA
    # The build time as a number keeps versions monotonic across builds without a counter to store.
    obj.setdefault("version", int(now.strftime("%Y%m%d%H%M%S")))
    obj.setdefault("created", format_time(now))
    obj.setdefault("expires", format_time(now + timedelta(days=DEFAULT_EXPIRY_DAYS)))
    obj.setdefault("model", {})
    obj["model"].setdefault("file", model_name)
    obj.setdefault("eval", {})
    obj["eval"].setdefault("file", "eval.npz")
    obj.setdefault("compression", [])
    obj.setdefault("metrics", {})
    obj.setdefault("health", {})
    return obj


def _place(staging: Path, out_dir: Path) -> None:
    """Rename the finished staging folder to `out_dir`; an old bundle there is replaced, anything else refused."""
    if out_dir.exists():
        if not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists()):
            raise BundleError(
                "output-not-bundle",
                f"{out_dir} exists and is not a bundle folder; choose another output path or remove it",
            )
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    fsync_dir(out_dir.parent)


def create_bundle(
    out_dir: PathLike,
    *,
    model_path: PathLike,
    eval_npz_path: PathLike,
    manifest_fields: Mapping[str, Any],
    private_key: Ed25519PrivateKey,
    extra_files: Optional[Mapping[str, PathLike]] = None,
    report: Optional[Mapping[str, Any]] = None,
) -> Path:
    """Write a signed bundle folder: model, eval.npz, report.json, extra files, canonical manifest, signature.

    `manifest_fields` holds everything but `files` (filled here) and may omit schema, version (default
    build time YYYYMMDDHHMMSS), created, expires (default 30 days) and the model/eval file names.
    """
    out = Path(out_dir)
    model_src, eval_src = Path(model_path), Path(eval_npz_path)
    for what, src in (("model", model_src), ("eval data", eval_src)):
        if not src.is_file():
            raise BundleError("input-missing", f"the {what} file {src} does not exist")
    obj = _fill_defaults(manifest_fields, model_src.name)
    sources: dict[str, Path] = {obj["model"]["file"]: model_src, obj["eval"]["file"]: eval_src}
    for rel, extra in (extra_files or {}).items():
        sources[rel] = Path(extra)
    try:
        for rel in sources:
            check_relpath(rel, "files")
    except VerifyError as exc:
        raise BundleError("manifest-invalid", exc.reason) from None
    if {MANIFEST_FILE, SIGNATURE_FILE} & set(sources) or (report is not None and REPORT_FILE in sources):
        raise BundleError(
            "manifest-invalid", "a bundle file may not be named manifest.json, signature.json or report.json"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for rel, src in sources.items():
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dest)
        if report is not None:
            (staging / REPORT_FILE).write_bytes(
                (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
            )
        files = {}
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            files[path.relative_to(staging).as_posix()] = {
                "size": path.stat().st_size,
                "sha256": _sha256_file(path),
            }
        obj["files"] = files
        try:
            Manifest.from_dict(obj)
        except VerifyError as exc:
            raise BundleError(exc.code, f"the manifest would not verify on a device: {exc.reason}") from None
        manifest_bytes = canonical_bytes(obj)
        atomic_write_bytes(staging / MANIFEST_FILE, manifest_bytes)
        atomic_write_bytes(
            staging / SIGNATURE_FILE, canonical_bytes({"signatures": [sign(manifest_bytes, private_key)]})
        )
        _place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def sign_bundle(
    bundle_dir: PathLike, private_key: Ed25519PrivateKey, *, append: bool = False
) -> dict[str, Any]:
    """(Re-)sign a bundle's manifest; `append=True` adds a signature for roots that need several. Returns the document."""
    root = Path(bundle_dir)
    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    try:
        Manifest.from_bytes(manifest_bytes)
    except VerifyError as exc:
        raise BundleError(exc.code, f"{root / MANIFEST_FILE} is not a valid manifest: {exc.reason}") from None
    if canonical_bytes(json.loads(manifest_bytes)) != manifest_bytes:
        raise BundleError(
            "manifest-not-canonical", f"{root / MANIFEST_FILE} is not canonical JSON; rebuild the bundle"
        )
    entry = sign(manifest_bytes, private_key)
    sigs: list[dict[str, str]] = []
    if append and (root / SIGNATURE_FILE).exists():
        sigs = [
            s
            for s in json.loads((root / SIGNATURE_FILE).read_bytes()).get("signatures", [])
            if s.get("keyid") != entry["keyid"]
        ]
    doc = {"signatures": [*sigs, entry]}
    atomic_write_bytes(root / SIGNATURE_FILE, canonical_bytes(doc))
    return doc


def pack(bundle_dir: PathLike, tar_path: PathLike) -> Path:
    """Pack a bundle folder into one uncompressed, reproducible `.tar` (sorted names, zero times and owners)."""
    root, target = Path(bundle_dir), Path(tar_path)
    if not (root / MANIFEST_FILE).is_file():
        raise BundleError(
            "not-a-bundle", f"{root} has no manifest.json; pack a folder made by `edgefleet build`"
        )
    entries = sorted(p for p in root.rglob("*"))
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with (
            os.fdopen(fd, "wb") as raw,
            tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            for path in entries:
                if path.is_symlink() or not (path.is_file() or path.is_dir()):
                    raise BundleError(
                        "file-not-regular", f"{path} is a link or device; a bundle holds regular files only"
                    )
                if path.is_dir():
                    continue
                info = tarfile.TarInfo(path.relative_to(root).as_posix())
                info.size = path.stat().st_size
                info.mode = 0o644
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            tar.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def _check_member(member: tarfile.TarInfo) -> str:
    """Refuse tar entries that could write outside the target or create links and devices."""
    name = member.name
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or "\\" in name:
        raise BundleError(
            "tar-absolute-path", f"the tar holds {name!r}, an absolute path; refusing to unpack it"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(
            "tar-parent-path", f"the tar holds {name!r}, which climbs out with `..`; refusing to unpack it"
        )
    if member.issym() or member.islnk():
        raise BundleError(
            "tar-link",
            f"the tar holds {name!r}, a link to {member.linkname!r}; bundles hold regular files only",
        )
    if not (member.isfile() or member.isdir()):
        raise BundleError(
            "tar-special-file", f"the tar holds {name!r}, a device, FIFO or other special file; refusing it"
        )
    if not parts:
        raise BundleError("tar-absolute-path", f"the tar holds an entry with an empty name {name!r}")
    return "/".join(parts)


def unpack(tar_path: PathLike, dest_dir: PathLike, *, max_bytes: int = DEFAULT_MAX_UNPACK_BYTES) -> Path:
    """Unpack a bundle `.tar` into `dest_dir` (new or empty) after checking every entry; on failure nothing stays."""
    source, dest = Path(tar_path), Path(dest_dir)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise BundleError("output-not-empty", f"{dest} exists and is not empty; unpack into a new folder")
    try:
        tar = tarfile.open(source, mode="r:*")  # noqa: SIM115 - closed by the `with tar:` below
    except FileNotFoundError:
        raise BundleError("input-missing", f"{source} does not exist") from None
    except tarfile.TarError as exc:
        raise BundleError("tar-invalid", f"{source} is not a readable tar file: {exc}") from None
    created = not dest.exists()
    try:
        with tar:
            members: list[tuple[tarfile.TarInfo, str]] = []
            total = 0
            # Check every header before writing anything, so a bad entry late in the tar leaves no trace.
            for member in tar:
                if len(members) >= MAX_TAR_MEMBERS:
                    raise BundleError(
                        "tar-too-many-files", f"{source} has over {MAX_TAR_MEMBERS} entries; not a bundle"
                    )
                members.append((member, _check_member(member)))
                total += member.size
                if total > max_bytes:
                    raise BundleError("tar-too-large", f"{source} unpacks to over {max_bytes} bytes")
            dest.mkdir(parents=True, exist_ok=True)
            for member, rel in members:
                target = dest.joinpath(*rel.split("/"))
                if member.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                if target.exists():
                    raise BundleError("tar-duplicate", f"{source} holds {rel!r} twice; refusing it")
                handle = tar.extractfile(member)
                if handle is None:
                    raise BundleError("tar-special-file", f"{rel!r} in {source} has no content")
                with handle:
                    copy_bounded(handle, target, member.size, max_bytes)
    except BaseException:
        if created:
            shutil.rmtree(dest, ignore_errors=True)
        elif dest.is_dir():
            for child in list(dest.iterdir()):
                if child.is_dir():
                    shutil.rmtree(child, ignore_errors=True)
                else:
                    child.unlink()
        raise
    return dest


@contextmanager
def load_bundle(path: PathLike) -> Iterator[Path]:
    """Yield a bundle folder: the folder itself, or a `.tar` unpacked into a temporary folder removed afterwards."""
    source = Path(path)
    if source.is_dir():
        if not (source / MANIFEST_FILE).is_file():
            raise BundleError(
                "not-a-bundle", f"{source} has no manifest.json; is it the output of `edgefleet build`?"
            )
        yield source
        return
    if not source.exists():
        raise BundleError("input-missing", f"{source} does not exist; give a bundle folder or .tar")
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bundle-"))
    try:
        yield unpack(source, tmp / "bundle")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def verify_bundle(
    bundle_dir: PathLike,
    public_keys: Optional[Sequence[PathLike]] = None,
    *,
    max_bytes: Optional[int] = None,
    check_expiry: bool = True,
) -> Manifest:
    """The host's one bundle check, on top of the device's `verify_bundle_dir`; returns the parsed Manifest.

    With public keys: the signature by one of them and every file (none missing, none unlisted). Without:
    every listed file against the manifest only (authenticity unknown). The host has no version ledger
    or device id, so neither is checked; `check_expiry=False` only asks "is it authentic" (inspect).
    `max_bytes` caps every file (default: the largest size the manifest declares). Raises VerifyError.
    """
    from edgefleet.agent.core.trust import TrustStore
    from edgefleet.agent.core.verify import verify_bundle_dir, verify_file

    root = Path(bundle_dir)
    try:
        manifest = Manifest.from_bytes((root / MANIFEST_FILE).read_bytes())
    except FileNotFoundError:
        raise VerifyError(
            "file-missing",
            f"{root / MANIFEST_FILE} is missing: is {root} a bundle made by `edgefleet build`?",
        ) from None
    limit = max_bytes if max_bytes is not None else max([e.size for e in manifest.files.values()] + [1])
    if not public_keys:
        for rel, entry in sorted(manifest.files.items()):
            verify_file(root / rel, entry, limit)
        return manifest
    trust = TrustStore.from_public_keys([str(k) for k in public_keys])
    return verify_bundle_dir(
        root,
        trust,
        profile=manifest.target.profile,
        device_id=None,
        ledger=None,
        max_model_bytes=limit,
        now=None if check_expiry else manifest.created_at,
    )


def inspect_bundle(bundle_dir: PathLike, public_keys: Optional[list[PathLike]] = None) -> dict[str, Any]:
    """Describe a bundle folder: manifest, file sizes, metrics and whether it verifies (against the keys, if given).

    `verified` is True, False (tampered: `code` and `reason` say how) or None when no key was given and
    only the files were checked against the manifest.
    """
    root = Path(bundle_dir)
    manifest_bytes = (root / MANIFEST_FILE).read_bytes()
    result: dict[str, Any] = {
        "path": str(root),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
    }
    try:
        manifest = Manifest.from_bytes(manifest_bytes)
    except VerifyError as exc:
        return {**result, "verified": False, "code": exc.code, "reason": exc.reason, "manifest": None}
    result["manifest"] = manifest.to_dict()
    result["files"] = [
        {
            "path": rel,
            "declared_size": e.size,
            "size": (root / rel).stat().st_size if (root / rel).is_file() else None,
        }
        for rel, e in sorted(manifest.files.items())
    ]
    result["metrics"] = manifest.metrics
    sigs = (
        json.loads((root / SIGNATURE_FILE).read_bytes())
        if (root / SIGNATURE_FILE).is_file()
        else {"signatures": []}
    )
    result["signed_by"] = [s.get("keyid") for s in sigs.get("signatures", []) if isinstance(s, dict)]
    try:
        verify_bundle(root, public_keys, check_expiry=False)
        result["verified"] = True if public_keys else None
    except VerifyError as exc:
        result.update(verified=False, code=exc.code, reason=exc.reason)
    result["expired"] = manifest.expires_at <= datetime.now(timezone.utc)
    return result
