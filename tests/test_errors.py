"""One exception root per side: every host error class derives from EdgefleetError, the agent's from AgentError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import edgefleet.converters
import edgefleet.sdk
from edgefleet.agent.core.errors import AgentError
from edgefleet.sdk.errors import EdgefleetError

# Not an error: the demo turns SIGINT/SIGTERM into this to unwind, like KeyboardInterrupt.
NOT_ERRORS = {"edgefleet.sdk.demo.options.DemoInterrupted"}


def _host_exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in a host module, by qualified name."""
    found: dict[str, type[BaseException]] = {}
    for package in (edgefleet.sdk, edgefleet.converters):
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            module = importlib.import_module(info.name)
            for _, obj in inspect.getmembers(module, inspect.isclass):
                if issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                    found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def test_every_host_exception_derives_from_the_host_root() -> None:
    # prepare
    classes = _host_exception_classes()
    # act
    strays = sorted(name for name, cls in classes.items() if not issubclass(cls, EdgefleetError))
    # assert: the families named in docs/architecture.md are all found, and nothing escapes the root
    assert strays == sorted(NOT_ERRORS)
    for family in (
        "edgefleet.sdk.build.errors.BuildError",
        "edgefleet.sdk.fleet.errors.FleetError",
        "edgefleet.sdk.server.errors.ServerError",
        "edgefleet.sdk.trust.keys.KeysError",
        "edgefleet.sdk.trust.errors.CredentialsError",
        "edgefleet.sdk.compress.base.CompressionError",
        "edgefleet.converters.errors.ConversionError",
    ):
        assert family in classes


def test_device_and_host_roots_are_separate() -> None:
    assert not issubclass(AgentError, EdgefleetError)
    assert not issubclass(EdgefleetError, AgentError)


def test_converters_import_only_the_root_from_sdk() -> None:
    # act: a fresh interpreter, so modules other tests loaded do not count
    code = (
        "import sys, edgefleet.converters; "
        "print(sorted(m for m in sys.modules if m.startswith('edgefleet.sdk')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # assert: converters sit below sdk; the exception root is the one module they take from it
    assert out.strip() == "['edgefleet.sdk', 'edgefleet.sdk.errors']"
