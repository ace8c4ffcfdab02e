"""Runtime plug-ins: one class per inference engine, registered by name; engines are imported lazily."""

from __future__ import annotations

from edgefleet.agent.core.runtimes.base import RUNTIMES, Runtime, TensorInfo, load_runtime

__all__ = ["RUNTIMES", "Runtime", "TensorInfo", "load_runtime"]
