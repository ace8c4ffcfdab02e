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


def runs_onnx_on_gpu(profile: Any) -> bool:
    """Whether the profile's first onnxruntime runtime uses its GPU (CUDA or TensorRT)."""
    if getattr(profile, "gpu", None) is None:
        return False
    for runtime in getattr(profile, "runtimes", ()):
        if str(runtime).startswith("onnxruntime"):
            return str(runtime) in ("onnxruntime-cuda", "onnxruntime-tensorrt")
    return False


def host_gpu_providers(profile: Any) -> list[str]:
    """The profile's GPU execution providers that this host's onnxruntime offers ([] when no GPU is at hand).

    For the build's measurement hook: a GPU profile's candidates can be timed on them instead of being
    ranked by the estimate alone.
    """
    if not runs_onnx_on_gpu(profile):
        return []
    try:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
    except ImportError:
        return []
    wanted = profile.onnx_providers() if hasattr(profile, "onnx_providers") else []
    return [p for p in wanted if p != "CPUExecutionProvider" and p in available]


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
