"""Read a profile TOML file (built-in name or user path) into a validated `Profile`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

from edgefleet.device_profiles.errors import ProfileError
from edgefleet.device_profiles.schema import EFFICIENCY_KEYS, ISA_FEATURES, PRECISIONS, RUNTIMES, Gpu, Profile

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the devices' Python 3.9/3.10
    import tomli as tomllib

BUILTIN_DIR = Path(__file__).resolve().parent
BUILTIN_NAMES: Tuple[str, ...] = (
    "rpi-zero-2w",
    "rpi3b",
    "rpi4b",
    "rpi5",
    "jetson-nano",
    "jetson-orin-nano",
    "jetson-agx-orin",
    "x86-64",
    "arm64",
    "host",
)

# (TOML key path, Profile field, kind, required). Kinds: str, int, float, isa, runtimes, precisions.
_FIELDS: Tuple[Tuple[str, str, str, bool], ...] = (
    ("name", "name", "str", True),
    ("description", "description", "str", True),
    ("cpu.model", "cpu_model", "str", True),
    ("cpu.cores", "cores", "int", True),
    ("cpu.clock_ghz", "clock_ghz", "float", True),
    ("cpu.isa", "isa", "isa", True),
    ("cpu.sustained_gflops", "sustained_gflops", "float", True),
    ("cpu.fp16_speedup", "fp16_speedup", "float", True),
    ("cpu.int8_speedup", "int8_speedup", "float", True),
    ("memory.ram_mb", "ram_mb", "int", True),
    ("memory.bandwidth_gbs", "mem_bandwidth_gbs", "float", True),
    ("software.runtimes", "runtimes", "runtimes", True),
    ("software.precisions", "precisions", "precisions", True),
    ("software.python", "python", "str", True),
    ("software.os", "os", "str", True),
    ("budgets.max_model_mb", "max_model_mb", "float", True),
    ("budgets.p95_latency_ms", "p95_latency_ms", "float", True),
    ("budgets.batch_size", "batch_size", "int", False),
    ("budgets.threads", "threads", "int", False),
)
_GPU_FIELDS: Tuple[Tuple[str, str, bool], ...] = (
    ("name", "str", True),
    ("precisions", "precisions", True),
    ("sustained_gflops", "float", True),
    ("fp16_speedup", "float", False),
    ("int8_speedup", "float", False),
)
_SECTIONS = ("cpu", "memory", "gpu", "software", "budgets", "sources", "efficiency")
_VOCAB: Dict[str, Tuple[str, ...]] = {"isa": ISA_FEATURES, "runtimes": RUNTIMES, "precisions": PRECISIONS}
_TYPE_WORDS = {
    "str": "a string",
    "int": "a positive integer",
    "float": "a positive number",
}

ProfileSource = Union[str, Path]


def builtin_names() -> List[str]:
    """The built-in profile names, in a fixed order (the README's profile table)."""
    return list(BUILTIN_NAMES)


def load_profile(name_or_path: ProfileSource) -> Profile:
    """A built-in profile by name, or the profile in a user's TOML file given by path."""
    text = str(name_or_path)
    if text == "host":
        from edgefleet.device_profiles.host import load_host_profile

        return load_host_profile()
    if text in BUILTIN_NAMES:
        return load_profile_file(BUILTIN_DIR / f"{text}.toml")
    path = Path(text).expanduser()
    if path.suffix == ".toml" or path.exists() or "/" in text or "\\" in text:
        if not path.is_file():
            raise ProfileError(
                f"{path}: no such profile file; pass an existing .toml path or a built-in name"
            )
        return load_profile_file(path)
    raise ProfileError(
        f"unknown device profile {text!r}; built-in profiles: {', '.join(BUILTIN_NAMES)} "
        "(or pass the path of your own .toml file)"
    )


def read_profile_table(path: Path) -> Dict[str, Any]:
    """The raw TOML table of a profile file, with syntax errors reported against the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: TOML syntax error: {exc}; fix the file (see docs/profiles.md)") from None
    except OSError as exc:
        raise ProfileError(f"{path}: cannot read profile file: {exc.strerror}") from None


def load_profile_file(path: Path, overrides: Optional[Mapping[str, Any]] = None) -> Profile:
    """Parse and validate one profile file; `overrides` (dotted keys) replace values read from it."""
    table = read_profile_table(path)
    for key, value in (overrides or {}).items():
        _set_dotted(table, key, value)
    return profile_from_table(table, str(path))


def profile_from_table(table: Mapping[str, Any], origin: str) -> Profile:
    """Validate a profile table; every error names `origin`, the field and what is allowed."""
    top_known = {key.split(".")[0] for key, _, _, _ in _FIELDS} | set(_SECTIONS)
    for key in table:
        if key not in top_known:
            raise ProfileError(
                f"{origin}: unknown field {key!r}; allowed top-level keys: {', '.join(sorted(top_known))}"
            )
    for section in _SECTIONS:
        if section in table and not isinstance(table[section], dict):
            raise ProfileError(f"{origin}: field {section!r} must be a table ([{section}])")
    values: Dict[str, Any] = {}
    for key, attr, kind, required in _FIELDS:
        raw = _get_dotted(table, key)
        if raw is None:
            if required:
                raise ProfileError(
                    f"{origin}: missing field {key!r}; it must be {_describe(kind)} (see docs/profiles.md)"
                )
            continue
        values[attr] = _check(origin, key, raw, kind)
    for section in ("cpu", "memory", "software", "budgets"):
        allowed = [k.split(".", 1)[1] for k, _, _, _ in _FIELDS if k.startswith(section + ".")]
        for key in table.get(section, {}):
            if key not in allowed:
                raise ProfileError(
                    f"{origin}: unknown field '{section}.{key}'; allowed in [{section}]: {', '.join(allowed)}"
                )
    values["gpu"] = _gpu(origin, table.get("gpu"))
    values["sources"] = _sources(origin, table.get("sources", {}))
    values["efficiency"] = _efficiency(origin, table.get("efficiency", {}))
    profile = Profile(path=origin, **values)
    _check_consistency(origin, profile)
    return profile


def _gpu(origin: str, raw: Any) -> Optional[Gpu]:
    """The optional [gpu] table as a Gpu."""
    if raw is None:
        return None
    allowed = [name for name, _, _ in _GPU_FIELDS]
    for key in raw:
        if key not in allowed:
            raise ProfileError(f"{origin}: unknown field 'gpu.{key}'; allowed in [gpu]: {', '.join(allowed)}")
    values: Dict[str, Any] = {}
    for key, kind, required in _GPU_FIELDS:
        if key not in raw:
            if required:
                raise ProfileError(
                    f"{origin}: missing field 'gpu.{key}'; it must be {_describe(kind)} (or drop the [gpu] table)"
                )
            continue
        values[key] = _check(origin, f"gpu.{key}", raw[key], kind)
    return Gpu(**values)


def _efficiency(origin: str, raw: Mapping[str, Any]) -> Dict[str, float]:
    """The optional [efficiency] table: op class → share of the sustained figures (docs/profiles.md)."""
    out: Dict[str, float] = {}
    for key, value in raw.items():
        if key not in EFFICIENCY_KEYS:
            raise ProfileError(
                f"{origin}: unknown field 'efficiency.{key}'; allowed in [efficiency]: {', '.join(EFFICIENCY_KEYS)}"
            )
        limit = 1e6 if key == "op_overhead_us" else 4.0
        try:
            number = _as_float(value)
        except TypeError:
            number = -1.0
        if not 0 < number <= limit:
            raise ProfileError(
                f"{origin}: field 'efficiency.{key}' must be a number in (0, {limit:g}] (got {value!r}); "
                "refit it with `edgefleet profiles calibrate`"
            )
        out[key] = number
    return out


def _sources(origin: str, raw: Mapping[str, Any]) -> Dict[str, str]:
    """The [sources] table: Profile field name → "figure — source"."""
    import dataclasses

    known = [f.name for f in dataclasses.fields(Profile) if f.name not in ("sources", "path", "efficiency")]
    known.append("efficiency")
    out: Dict[str, str] = {}
    for key, value in raw.items():
        if key not in known:
            raise ProfileError(f"{origin}: unknown field 'sources.{key}'; allowed: {', '.join(known)}")
        if not isinstance(value, str):
            raise ProfileError(f"{origin}: field 'sources.{key}' must be a string (\"figure — source\")")
        out[key] = value
    return out


def _check_consistency(origin: str, profile: Profile) -> None:
    """Cross-field rules: fp32 always supported, GPU runtimes need a GPU."""
    if "fp32" not in profile.precisions:
        raise ProfileError(
            f"{origin}: field 'software.precisions' must include 'fp32' (every runtime runs it)"
        )
    if profile.gpu is None:
        gpu_runtimes = [r for r in profile.runtimes if r in ("onnxruntime-cuda", "onnxruntime-tensorrt")]
        if gpu_runtimes:
            raise ProfileError(
                f"{origin}: field 'software.runtimes' names {', '.join(gpu_runtimes)} but the profile has no "
                "[gpu] table; add one or use tflite-xnnpack, tflite, onnxruntime-cpu"
            )
    if profile.threads > profile.cores:
        raise ProfileError(
            f"{origin}: field 'budgets.threads' is {profile.threads}; allowed: 1..{profile.cores} (cpu.cores)"
        )


def _describe(kind: str) -> str:
    """Words for what a field of `kind` accepts."""
    if kind in _VOCAB:
        return f"a list drawn from: {', '.join(_VOCAB[kind])}"
    return _TYPE_WORDS[kind]


def _check(origin: str, key: str, raw: Any, kind: str) -> Any:
    """A value converted to its field's type, or a ProfileError naming file, field and allowed values."""
    checkers: Dict[str, Callable[[Any], Any]] = {"str": _as_str, "int": _as_int, "float": _as_float}
    if kind in _VOCAB:
        vocab = _VOCAB[kind]
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ProfileError(
                f"{origin}: field {key!r} must be a list of strings drawn from: {', '.join(vocab)} "
                f"(got {type(raw).__name__} {raw!r})"
            )
        for value in raw:
            if value not in vocab:
                raise ProfileError(
                    f"{origin}: field {key!r} has unknown value {value!r}; allowed: {', '.join(vocab)}"
                )
        if len(set(raw)) != len(raw):
            raise ProfileError(f"{origin}: field {key!r} lists a value twice: {raw!r}")
        if not raw and kind != "isa":
            raise ProfileError(f"{origin}: field {key!r} is empty; list at least one of: {', '.join(vocab)}")
        return tuple(raw)
    try:
        return checkers[kind](raw)
    except (TypeError, ValueError):
        raise ProfileError(
            f"{origin}: field {key!r} must be {_TYPE_WORDS[kind]} (got {type(raw).__name__} {raw!r})"
        ) from None


def _as_str(raw: Any) -> str:
    if not isinstance(raw, str) or not raw.strip():
        raise TypeError(raw)
    return raw


def _as_int(raw: Any) -> int:
    # bool is an int in Python; `cores = true` is a mistake, not 1
    if isinstance(raw, bool) or not isinstance(raw, int) or raw <= 0:
        raise TypeError(raw)
    return raw


def _as_float(raw: Any) -> float:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not raw > 0:
        raise TypeError(raw)
    return float(raw)


def _get_dotted(table: Mapping[str, Any], key: str) -> Any:
    """table["a"]["b"] for "a.b", None when any part is absent."""
    node: Any = table
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def _set_dotted(table: Dict[str, Any], key: str, value: Any) -> None:
    """table["a"]["b"] = value for "a.b", creating tables on the way."""
    parts = key.split(".")
    node = table
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
