"""Host side of edgefleet: build, bundles and signing, fleet control plane, store, API and CLI.

`edgefleet.sdk.build(model, profile, ...)` is resolved lazily so `import edgefleet.sdk` stays light
(no torch, onnx or onnxruntime until a build runs).
"""

from __future__ import annotations

from typing import Any

__all__ = ["Fleet", "build"]


def __getattr__(name: str) -> Any:
    if name == "build":
        from edgefleet.sdk.build.builder import build

        return build
    if name == "Fleet":
        from edgefleet.sdk.fleet.client import Fleet

        return Fleet
    raise AttributeError(f"module 'edgefleet.sdk' has no attribute {name!r}")
