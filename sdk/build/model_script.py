"""A model given as Python code: `FILE.py:NAME`, the user's own script that defines or builds the model.

`edgefleet build model.py:make_model` (or `finetune`) imports FILE.py on the build host and takes NAME
from it: an `nn.Module` instance, an `nn.Module` subclass or a function of no arguments that returns one
(or an ExportedProgram). This is how a model reaches the steps that need its Python structure —
structured pruning of its layers, `--student auto` (a shallower copy of a transformer), fine-tuning
chosen layers — from the command line; a .pt2 or TorchScript file holds a graph without them. Microsoft
Olive's `model_script` + `model_loader` do the same. It runs the user's own code on the user's build
host, which is what they asked for by naming it; model files (.pt/.pt2) are still never unpickled, and
nothing here reaches a device.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Optional, Union

from edgefleet.sdk.build.errors import ModelLoadError

_REF = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")
FORM = "FILE.py:NAME (NAME: an nn.Module, its class, or a function of no arguments returning one)"


def script_ref(model: Union[str, Path]) -> Optional[tuple[Path, str]]:
    """(script, name) when `model` reads FILE.py:NAME, else None (a model file)."""
    match = _REF.match(str(model))
    return (Path(match["file"]), match["name"]) if match else None


def check_script(model: Union[str, Path]) -> None:
    """A FILE.py:NAME whose file is missing fails before anything heavy runs."""
    ref = script_ref(model)
    if ref is not None and not ref[0].is_file():
        raise ModelLoadError(f"model script {ref[0]} does not exist; check the path of {FORM}")


def load_script_model(model: Union[str, Path]) -> Any:
    """Import the script and return its model: an nn.Module in eval mode, or an ExportedProgram."""
    ref = script_ref(model)
    if ref is None:
        raise ModelLoadError(f"{model} is not {FORM}")
    check_script(model)
    path, name = ref
    import torch

    # A stable module name per file, kept in sys.modules: deepcopy (pruning, students) and the
    # build's forked conversions find the model's classes there.
    module_name = "edgefleet_model_script_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"cannot import {path}; it must be a Python source file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ModelLoadError(
            f"running {path} failed: {type(exc).__name__}: {exc}; it must run on its own with `python {path}`"
        ) from exc
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items() if not k.startswith("_") and callable(v))
        raise ModelLoadError(
            f"{path} defines no {name!r}; it defines {', '.join(found) or 'nothing callable'}"
        )
    obj = getattr(module, name)
    if not isinstance(obj, (torch.nn.Module, torch.export.ExportedProgram)):
        if not callable(obj):
            raise ModelLoadError(f"{path}:{name} is a {type(obj).__name__}; {FORM}")
        try:
            obj = obj()
        except Exception as exc:
            raise ModelLoadError(f"{path}:{name}() failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(obj, torch.export.ExportedProgram):
        return obj
    if not isinstance(obj, torch.nn.Module):
        raise ModelLoadError(f"{path}:{name} gave a {type(obj).__name__}, not a torch nn.Module; {FORM}")
    return obj.eval()


__all__ = ["FORM", "check_script", "load_script_model", "script_ref"]
