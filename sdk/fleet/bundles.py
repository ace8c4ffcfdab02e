"""The bundles of a rollout: folders, `.tar` files or a build output folder, verified and keyed by profile."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.sdk.fleet.errors import BundleRefused


@dataclass(frozen=True)
class ResolvedBundle:
    """One verified bundle: where it lies, its manifest and the profile it was built for."""

    path: Path
    manifest_sha256: str
    manifest: dict[str, Any]

    @property
    def name(self) -> str:
        """Model name."""
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        """Monotonic model version."""
        return int(self.manifest["version"])

    @property
    def profile(self) -> str:
        """Target device profile."""
        return str(self.manifest["target"]["profile"])

    @property
    def size_bytes(self) -> int:
        """Bytes of every file the manifest lists."""
        return sum(int(e["size"]) for e in self.manifest["files"].values())


def _expand(path: Path, unpack_root: Path) -> list[Path]:
    """Bundle folders behind one argument: a bundle folder, a `.tar`, or a folder of bundle folders."""
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return [path]
        found = sorted(p.parent for p in path.glob("*/manifest.json"))
        if not found:
            raise BundleRefused(
                f"{path} holds no bundle (no manifest.json in it or in its sub-folders); pass the output "
                "folder of `edgefleet build`"
            )
        return found
    if path.is_file() and path.suffix == ".tar":
        from edgefleet.sdk.trust.bundle import BundleError, unpack

        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        dest = unpack_root / digest
        if not (dest / "manifest.json").is_file():
            # Rollouts outlive this process (resume after a restart), so the unpacked copy is kept.
            shutil.rmtree(dest, ignore_errors=True)
            try:
                unpack(path, dest)
            except BundleError as exc:
                raise BundleRefused(f"{path}: {exc}") from exc
        return [dest]
    raise BundleRefused(
        f"bundle {path} does not exist; give a bundle folder, a .tar or a build output folder"
    )


def load_bundles(
    paths: Iterable[str | Path], *, trusted_keys: Sequence[str | Path] = (), unpack_root: Path
) -> dict[str, ResolvedBundle]:
    """Verify every bundle and key them by target profile; two bundles for one profile are refused.

    With trusted keys, the signature and every file are checked; without, every file against the manifest.
    """
    from edgefleet.agent.core.errors import VerifyError
    from edgefleet.sdk.trust.bundle import verify_bundle

    keys = list(trusted_keys)
    by_profile: dict[str, ResolvedBundle] = {}
    arguments = list(paths)
    if not arguments:
        raise BundleRefused("no bundle given: pass at least one bundle folder, .tar or build output folder")
    for arg in arguments:
        for folder in _expand(Path(arg), unpack_root):
            manifest_bytes = (folder / "manifest.json").read_bytes()
            try:
                manifest = verify_bundle(folder, keys)
            except VerifyError as exc:
                raise BundleRefused(f"bundle {folder} does not verify: {exc.reason}") from exc
            resolved = ResolvedBundle(
                folder.resolve(), hashlib.sha256(manifest_bytes).hexdigest(), manifest.to_dict()
            )
            other = by_profile.get(resolved.profile)
            if other is not None and other.manifest_sha256 != resolved.manifest_sha256:
                raise BundleRefused(
                    f"two bundles target profile {resolved.profile!r} ({other.path} and {folder}); pass one "
                    "bundle per profile"
                )
            by_profile[resolved.profile] = resolved
    names = {b.name for b in by_profile.values()}
    if len(names) > 1:
        raise BundleRefused(
            f"the bundles hold different models ({', '.join(sorted(names))}); one rollout ships one model"
        )
    return by_profile
