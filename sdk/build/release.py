"""A release: one model built for several device profiles, `OUT/<profile>/`, one name and one version."""

from __future__ import annotations

import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from edgefleet.sdk.build.candidate import BuildResult
from edgefleet.sdk.build.errors import BuildError
from edgefleet.sdk.build.profile import resolve_profile


def release_version(version: Optional[int] = None) -> int:
    """`version` when given, else the build time as YYYYMMDDHHMMSS (what a single bundle gets by default)."""
    if version is not None:
        if isinstance(version, bool) or int(version) < 1:
            raise BuildError(f"--version must be a positive integer, got {version!r}")
        return int(version)
    return int(datetime.now(timezone.utc).strftime("%Y%m%d%H%M%S"))


def build_release(
    model: Any,
    profiles: Sequence[Any],
    out: Union[str, Path],
    *,
    version: Optional[int] = None,
    overwrite: bool = False,
    task: Optional[str] = None,
    **options: Any,
) -> dict[str, BuildResult]:
    """Build `model` for every profile into `out/<profile>/`, all with one name and one version.

    Every profile is resolved before the first build starts, so a mistyped one fails at once.
    `edgefleet deploy OUT/` then gives each device the bundle of its own profile. `options` are
    `build()`'s keyword arguments; `task` (classification, detection, ctc, embedding, auto) picks the
    quality metric of every build, as `edgefleet build --task` (None: the surrounding task_scope, else auto).
    """
    from edgefleet.sdk.build.builder import build, checked_task

    if task is not None:
        checked_task(task)  # a mistyped task fails before the first build, like a mistyped profile

    if not profiles:
        raise BuildError("a release needs at least one --profile")
    resolved = [resolve_profile(p) for p in profiles]
    names = [str(p.name) for p in resolved]
    if len(set(names)) != len(names):
        raise BuildError(f"--profile names a profile twice: {names}; give each profile once")
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise BuildError(
            f"output folder {out_dir} exists and is not empty; choose a new folder or pass --force"
        )
    number = release_version(version)
    results: dict[str, BuildResult] = {}
    for prof, pname in zip(resolved, names):
        target = out_dir / pname
        if target.exists() and overwrite:
            shutil.rmtree(target)
        results[pname] = build(
            model, prof, out=target, version=number, overwrite=overwrite, task=task, **options
        )
    return results


__all__ = ["build_release", "release_version"]
