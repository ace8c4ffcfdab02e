"""The build's plug-ins: import every converter and compressor, and list those this installation cannot run.

A plug-in whose module fails to import, or whose optional packages are missing, is never dropped in
silence: `load_plugins` returns one `Unavailable` per such plug-in, which `edgefleet build` prints and
report.json records under `unavailable`, so a user can see why a candidate family was not tried.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass
from typing import Any

# Compression plug-in modules under edgefleet.sdk.compress; each registers its steps on import.
COMPRESS_MODULES = ("ort_quant", "tflite_quant", "prune", "mixed_precision", "distill", "transfer", "student")
INSTALL_HINT = "pip install 'edgefleet[host]'"


@dataclass(frozen=True)
class Unavailable:
    """A plug-in this installation cannot run: its name, its kind and why."""

    name: str  # the registry name, or the module's when the module itself failed to import
    kind: str  # "converter", "compressor" or "module"
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form for report.json."""
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind}): unavailable: {self.reason}"


def _import_failure(module: str) -> str:
    """Import `module`; '' when it imports, else the error's first line."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0] if text else module}"
    return ""


def load_plugins() -> list[Unavailable]:
    """Import every converter and compression plug-in; return the plug-ins that cannot run here."""
    out: list[Unavailable] = []
    failed = _import_failure("edgefleet.converters")
    if failed:
        out.append(Unavailable("edgefleet.converters", "module", failed))
    for name in COMPRESS_MODULES:
        module = f"edgefleet.sdk.compress.{name}"
        failed = _import_failure(module)
        if failed:
            out.append(Unavailable(module, "module", failed))
    out.extend(_missing_extras())
    return out


def _missing_extras() -> list[Unavailable]:
    """Registered plug-ins whose optional packages are not importable here."""
    from edgefleet.sdk.compress.base import COMPRESSORS

    out: list[Unavailable] = []
    try:
        from edgefleet.converters.base import CONVERTERS
    except ImportError:
        pass  # already reported by load_plugins as an unavailable module
    else:
        for name in CONVERTERS.names():
            missing = CONVERTERS.get(name).missing()
            if missing:
                out.append(Unavailable(name, "converter", f"needs {', '.join(missing)}: {INSTALL_HINT}"))
    for name in COMPRESSORS.names():
        missing = COMPRESSORS.get(name).requires.missing_extras()
        if missing:
            out.append(Unavailable(name, "compressor", f"needs {', '.join(missing)}: {INSTALL_HINT}"))
    return out
