"""The device profile a build targets: resolved from a name or file, its runtimes, its report form."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefleet.sdk.build.errors import ProfileError


def resolve_profile(profile: Any) -> Any:
    """A Profile object from a name, a TOML path, or a Profile itself."""
    if not isinstance(profile, (str, Path)):
        return profile
    try:
        from edgefleet.device_profiles import load_profile
    except ImportError as exc:
        raise ProfileError(
            f"cannot load device profile {str(profile)!r}: edgefleet.device_profiles is not available in this installation"
        ) from exc
    try:
        return load_profile(str(profile))
    except Exception as exc:  # the loader's own error types: unknown name, bad TOML, schema errors
        raise ProfileError(f"{exc}") from exc


def runtime_names(profile: Any) -> list[str]:
    """The profile's runtimes reduced to the plan's two families: "onnxruntime" and "tflite"."""
    names = profile.runtime_names() if hasattr(profile, "runtime_names") else list(profile.runtimes)
    out: list[str] = []
    for raw in names:
        # Profiles name execution providers/delegates (onnxruntime-cuda, tflite-xnnpack); the file
        # format and runtime package are what the plan chooses between.
        family = (
            "onnxruntime"
            if str(raw).startswith("onnxruntime")
            else "tflite"
            if str(raw).startswith(("tflite", "litert"))
            else str(raw)
        )
        if family not in out:
            out.append(family)
    return out


def profile_dict(prof: Any) -> dict[str, Any]:
    """The profile fields report.json records, runtimes reduced to their families."""
    keys = (
        "name",
        "cores",
        "threads",
        "precisions",
        "max_model_mb",
        "p95_latency_ms",
        "batch_size",
        "sustained_gflops",
    )
    out = {k: getattr(prof, k) for k in keys if hasattr(prof, k)}
    out["runtimes"] = runtime_names(prof)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}
