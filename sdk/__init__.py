"""Host side of edgefleet: build, bundles and signing, fleet control plane, store, API and CLI.

`edgefleet.sdk.build(model, profile, ...)` is resolved lazily so `import edgefleet.sdk` stays light
(no torch, onnx or onnxruntime until a build runs).
"""

from __future__ import annotations

import sys
from typing import Any

# The host's dependencies (torch, litert-torch, fastapi, ...) need Python >= 3.10. A device with only the
# `agent` extra still gets the `edgefleet` script: say why it cannot run rather than fail deep in an import.
if sys.version_info < (3, 10):
    raise ImportError(
        f"edgefleet's host SDK (the `edgefleet` command, extra [host]) needs Python >= 3.10; this is Python "
        f"{sys.version_info[0]}.{sys.version_info[1]}. On a device run `edgefleet-agent` (extra [agent]), "
        "which runs on Python 3.8+."
    )

__all__ = ["Fleet", "build"]


def __getattr__(name: str) -> Any:
    if name == "build":
        from edgefleet.sdk.build.builder import build

        return build
    if name == "Fleet":
        from edgefleet.sdk.fleet.client import Fleet

        return Fleet
    raise AttributeError(f"module 'edgefleet.sdk' has no attribute {name!r}")
