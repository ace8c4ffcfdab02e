"""Load what `edgefleet build` is given: TorchScript / ExportedProgram / .onnx / .tflite files and .npz data.

Nothing here unpickles: TorchScript and ExportedProgram archives load through torch's own formats, so a
model file cannot run arbitrary code on the build host.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from edgefleet.converters.base import TensorSpec
from edgefleet.sdk.build.errors import DataError, ModelLoadError

TORCH_SUFFIXES = (".pt", ".pth", ".pt2", ".ts", ".torchscript", ".jit")


@dataclass
class LoadedModel:
    """A model ready for the plan: a torch module (stage "torch") or the path of an ONNX/TFLite file."""

    stage: str  # "torch", "onnx" or "tflite"
    model: Any  # an nn.Module, a torch.export ExportedProgram, a TorchScript module, or a file path
    inputs: list[TensorSpec] = field(default_factory=list)
    source: Optional[Path] = None
    kind: str = ""  # "module", "exported", "torchscript", "onnx" or "tflite" (SOURCE_KINDS)
    static_batch: Optional[int] = None  # the batch a .pt2 was exported with when it is not dynamic

    def __post_init__(self) -> None:
        if not self.kind:
            self.kind = "module" if self.stage == "torch" else self.stage


# What each source can become; docs/build.md and the README's "Build" table say the same.
SOURCE_KINDS = ("module", "exported", "torchscript", "onnx", "tflite")
SOURCE_LABELS = {
    "module": "a Python nn.Module",
    "exported": "a torch.export .pt2",
    "torchscript": "a TorchScript file",
    "onnx": "an .onnx file",
    "tflite": "a .tflite file",
}


def load_model(path: Union[str, Path]) -> LoadedModel:
    """Open a model file by suffix, with an error naming the problem for missing/corrupt/truncated files."""
    path = Path(path)
    suffix = check_model_file(path)
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".tflite":
        return _load_tflite(path)
    return _load_torch(path)


def check_model_file(path: Path) -> str:
    """The file's lower-case suffix once it exists, is a non-empty file of a known format (no heavy imports)."""
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is not a file; pass a .pt/.pt2 (TorchScript/ExportedProgram), .onnx or .tflite"
        )
    if path.stat().st_size == 0:
        raise ModelLoadError(f"model file {path} is empty; re-export the model")
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".tflite", *TORCH_SUFFIXES):
        return suffix
    raise ModelLoadError(
        f"cannot tell the format of {path.name} from its suffix {suffix!r}; use .pt/.pt2 (TorchScript or "
        "torch.export ExportedProgram), .onnx or .tflite"
    )


def source_kind(path: Path) -> str:
    """The source kind of a model file from its suffix and archive listing, without importing torch."""
    suffix = path.suffix.lower()
    if suffix in (".onnx", ".tflite"):
        return suffix[1:]
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile):
        return "unknown"
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        return "exported"
    if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return "torchscript"
    return "unknown"


def _load_onnx(path: Path) -> LoadedModel:
    import onnx

    from edgefleet.converters.errors import ConversionError
    from edgefleet.converters.runners import open_runner

    try:
        onnx.checker.check_model(str(path))
    except Exception as exc:  # DecodeError, ValidationError, …: the file is not a valid ONNX graph
        raise ModelLoadError(
            f"{path.name} is not a valid ONNX model (corrupt or truncated?): {_first_line(exc)}; re-export it"
        ) from exc
    try:
        runner = open_runner(path)
    except ConversionError as exc:
        raise ModelLoadError(f"{path.name}: {exc}") from exc
    return LoadedModel(stage="onnx", model=path, inputs=runner.inputs, source=path)


def _load_tflite(path: Path) -> LoadedModel:
    from edgefleet.converters.errors import ConversionError
    from edgefleet.converters.runners import open_runner

    try:
        runner = open_runner(path)
    except ConversionError as exc:
        raise ModelLoadError(
            f"{path.name} is not a loadable TFLite model (corrupt or truncated?): {exc}"
        ) from exc
    return LoadedModel(stage="tflite", model=path, inputs=runner.inputs, source=path)


def _load_torch(path: Path) -> LoadedModel:
    import torch

    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path.name} is not a TorchScript or ExportedProgram archive (corrupt or truncated?); save the "
            "model with torch.jit.save(torch.jit.script(m), ...) or torch.export.save(torch.export.export(m, "
            "args), ...) — pickled nn.Modules are refused because loading them runs code"
        )
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    errors = []
    if any(n.endswith("serialized_exported_program.json") or "/models/" in n for n in names):
        try:
            program = torch.export.load(str(path))
            return exported_source(program, path)
        except Exception as exc:  # torch.export raises many types for damaged archives
            errors.append(f"as ExportedProgram: {_first_line(exc)}")
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
        return LoadedModel(stage="torch", model=module, source=path, kind="torchscript")
    except Exception as exc:  # RuntimeError for damaged or non-TorchScript archives
        errors.append(f"as TorchScript: {_first_line(exc)}")
    raise ModelLoadError(
        f"cannot load {path.name} ({'; '.join(errors)}); the file may be corrupt or truncated"
    )


def exported_source(program: Any, path: Optional[Path] = None) -> LoadedModel:
    """A torch.export ExportedProgram as the build's source; converters export from the program itself."""
    from edgefleet.converters.torch_onnx import exported_batch

    return LoadedModel(
        stage="torch",
        model=program,
        inputs=_program_inputs(program),
        source=path,
        kind="exported",
        static_batch=exported_batch(program),
    )


def _program_inputs(program: Any) -> list[TensorSpec]:
    """Input names/shapes/dtypes an ExportedProgram was traced with (batch marked dynamic)."""
    specs = []
    user_inputs = [s for s in program.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    for spec in user_inputs:
        node = placeholders.get(spec.arg.name)
        value = node.meta.get("val") if node is not None else None
        if value is None or not hasattr(value, "shape"):
            continue
        shape = tuple(int(d) if type(d) is int else None for d in value.shape)
        dtype = str(value.dtype).replace("torch.", "")
        specs.append(TensorSpec(name=spec.arg.name, dtype=dtype, shape=shape))
    return specs


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass
class Dataset:
    """Model inputs (name → batch-first array) with optional integer labels."""

    inputs: dict[str, np.ndarray]
    labels: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0


DataLike = Union[str, Path, np.ndarray, dict, tuple, Dataset, None]


def load_dataset(data: DataLike, role: str) -> Optional[Dataset]:
    """Normalise `data` into a Dataset: an .npz path (`x`, optional `y`), an array, (x, y), or a dict.

    A dict (or .npz) may instead hold one array per model input, named like the inputs; `y` is labels.
    """
    if data is None:
        return None
    if isinstance(data, Dataset):
        ds = data
    elif isinstance(data, (str, Path)):
        ds = _load_npz(Path(data), role)
    elif isinstance(data, np.ndarray):
        ds = Dataset({"x": data})
    elif isinstance(data, tuple):
        if len(data) != 2:
            raise DataError(f"{role} data as a tuple must be (x, y); got {len(data)} items")
        x, y = data
        ds = Dataset(
            dict(x) if isinstance(x, dict) else {"x": np.asarray(x)}, None if y is None else np.asarray(y)
        )
    elif isinstance(data, dict):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        labels = arrays.pop("y", None)
        ds = Dataset(arrays, labels)
    else:
        raise DataError(
            f"{role} data of type {type(data).__name__} is not supported; pass an .npz path or arrays"
        )
    if not ds.inputs:
        raise DataError(f"{role} data holds no input arrays; save them as 'x' in the .npz")
    counts = {k: len(v) for k, v in ds.inputs.items()}
    if len(set(counts.values())) != 1:
        raise DataError(f"{role} inputs have different numbers of samples: {counts}")
    if len(ds) == 0:
        raise DataError(f"{role} data has no samples")
    if ds.labels is not None:
        if ds.labels.ndim != 1 or len(ds.labels) != len(ds):
            raise DataError(
                f"{role} labels 'y' must be one integer per sample ({len(ds)}); got shape {ds.labels.shape}"
            )
        if not np.issubdtype(ds.labels.dtype, np.integer):
            raise DataError(f"{role} labels 'y' must be integers (class indices); got {ds.labels.dtype}")
    return ds


def _load_npz(path: Path, role: str) -> Dataset:
    if not path.is_file():
        raise DataError(f"{role} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # BadZipFile, ValueError (pickled objects), OSError: not a usable .npz
        raise DataError(
            f"{role} file {path} is not a readable .npz ({_first_line(exc)}); save it with numpy.savez"
        ) from exc
    labels = arrays.pop("y", None)
    if "x" in arrays:
        return Dataset({"x": arrays["x"]}, labels)
    if not arrays:
        raise DataError(
            f"{role} file {path} has no array 'x'; save the inputs as numpy.savez(path, x=..., y=...)"
        )
    # Several named inputs (e.g. input_ids, attention_mask) are accepted; they are checked by name.
    return Dataset(arrays, labels)


def fit_to_inputs(ds: Dataset, specs: list[TensorSpec], role: str) -> Dataset:
    """Key the data by the model's input names and check ranks, fixed dims and dtype kinds."""
    names = [s.name for s in specs]
    if all(n in ds.inputs for n in names):
        arrays = [ds.inputs[n] for n in names]
    elif list(ds.inputs) == ["x"] and len(specs) == 1:
        arrays = [ds.inputs["x"]]
    else:
        raise DataError(
            f"the {role} data has no array 'x' (it has {list(ds.inputs)}) and its names do not match the model's "
            f"inputs {names}; save the input as 'x' (numpy.savez(path, x=..., y=...)) or one array per input name"
        )
    if len(arrays) != len(specs):
        raise DataError(f"the model takes {len(specs)} inputs {names}; the {role} data has {len(arrays)}")
    fitted: dict[str, np.ndarray] = {}
    for spec, array in zip(specs, arrays):
        if array.ndim != len(spec.shape):
            raise DataError(
                f"{role} input {spec.name!r} has shape {array.shape}, but the model expects "
                f"{_shape_text(spec.shape)}; reshape the data (batch first)"
            )
        for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
            if axis > 0 and want is not None and want != got:
                raise DataError(
                    f"{role} input {spec.name!r} has shape {array.shape}, but the model expects "
                    f"{_shape_text(spec.shape)} (dimension {axis} differs)"
                )
        fitted[spec.name] = _cast(array, spec, role)
    return Dataset(fitted, ds.labels)


def _cast(array: np.ndarray, spec: TensorSpec, role: str) -> np.ndarray:
    """Cast within a kind (float64 → float32, int32 → int64); refuse float data for an integer input."""
    want = np.dtype(spec.dtype)
    got = array.dtype
    if np.issubdtype(want, np.floating) and (
        np.issubdtype(got, np.floating) or np.issubdtype(got, np.integer)
    ):
        return np.ascontiguousarray(array, dtype=want)
    if np.issubdtype(want, np.integer) and np.issubdtype(got, np.integer):
        return np.ascontiguousarray(array, dtype=want)
    if want == got:
        return array
    raise DataError(
        f"{role} input {spec.name!r} has dtype {got}, but the model expects {want}; convert the data "
        f"(e.g. x.astype(np.{want.name}))"
    )


def _shape_text(shape: tuple[Optional[int], ...]) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")"


def parse_input_shape(text: str) -> list[tuple[int, ...]]:
    """'1,3,224,224' or '1x3x224x224;1x128' → one shape per input."""
    shapes = []
    for part in text.replace(" ", "").split(";"):
        if not part:
            continue
        try:
            dims = tuple(int(d) for d in part.replace("x", ",").split(",") if d)
        except ValueError:
            raise DataError(f"--input-shape {text!r} is not a list of integers like 1,3,224,224") from None
        if not dims or any(d <= 0 for d in dims):
            raise DataError(f"--input-shape {text!r} needs positive dimensions like 1,3,224,224")
        shapes.append(dims)
    if not shapes:
        raise DataError("--input-shape is empty; give it like 1,3,224,224")
    return shapes
