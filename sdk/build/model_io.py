"""Load what `edgefleet build` is given: TorchScript / ExportedProgram / .onnx / .tflite files and .npz data.

Nothing here unpickles: TorchScript and ExportedProgram archives load through torch's own formats, so a
model file cannot run arbitrary code on the build host. Code runs only when the user names their own
script as FILE.py:NAME (model_script.py).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from edgefleet.converters.base import TensorSpec
from edgefleet.sdk.build.errors import DataError, ModelLoadError
from edgefleet.sdk.build.model_script import check_script, load_script_model, script_ref

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
    """Open a model file by suffix (or run FILE.py:NAME), with an error naming what is wrong and the fix."""
    ref = script_ref(path)
    if ref is not None:
        import torch

        model = load_script_model(path)
        if isinstance(model, torch.export.ExportedProgram):
            return exported_source(model, ref[0])
        return LoadedModel(stage="torch", model=model, source=ref[0], kind="module")
    path = Path(path)
    suffix = check_model_file(path)
    if suffix == ".onnx":
        return _load_onnx(path)
    if suffix == ".tflite":
        return _load_tflite(path)
    return _load_torch(path)


def check_model_file(path: Path) -> str:
    """The file's lower-case suffix once it exists, is a non-empty file of a known format (no heavy imports)."""
    if script_ref(path) is not None:  # FILE.py:NAME, the user's model script (model_script.py)
        check_script(path)
        return ".py"
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
    if script_ref(path) is not None:
        return "module"  # what the script returns is built as a Python nn.Module
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
            "args), ...) — pickled nn.Modules are refused because loading them runs code; to build from your "
            "Python code, name it as MODEL.py:NAME"
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
    """Model inputs (name → batch-first array), optional labels `y` and training targets `y_*`.

    `labels` is what the quality scorer reads (docs/quality.md): class ids (N,), detection boxes
    (N, G, 5), CTC tokens (N, L) or target embeddings. `targets` holds the .npz's extra label arrays for
    the compression steps that train: `y_lengths` (CTC label lengths) and `y_0`, `y_1`, … (detection
    targets in the model's raw output layout); see `inputs.compress_targets`.
    """

    inputs: dict[str, np.ndarray]
    labels: Optional[np.ndarray] = None
    targets: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values()))) if self.inputs else 0

    def head(self, count: int) -> Dataset:
        """The first `count` rows of the inputs, the labels and the training targets."""
        return Dataset(
            {k: v[:count] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[:count],
            {k: v[:count] for k, v in self.targets.items()},
        )


DataLike = Union[str, Path, np.ndarray, dict, tuple, Dataset, None]
# Label arrays besides `y` that an .npz or dict may hold: training targets, never model inputs.
TARGET_KEY = re.compile(r"y_(lengths|\d+)")


def _pop_labels(arrays: dict[str, np.ndarray]) -> tuple[Optional[np.ndarray], dict[str, np.ndarray]]:
    """Take `y` and the training-target keys (`y_lengths`, `y_0`, …) out of `arrays`."""
    labels = arrays.pop("y", None)
    targets = {k: arrays.pop(k) for k in list(arrays) if TARGET_KEY.fullmatch(k)}
    return labels, targets


def load_dataset(data: DataLike, role: str, task: Optional[str] = None) -> Optional[Dataset]:
    """Normalise `data` into a Dataset: an .npz path (`x`, optional `y`), an array, (x, y), or a dict.

    A dict (or .npz) may instead hold one array per model input, named like the inputs; `y` is labels,
    `y_lengths` / `y_0`, `y_1`, … training targets. `task` (default: the build's, measure.build_task)
    decides which labels fit: class ids (N,) for classification, the task's format otherwise.
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
        inputs = dict(x) if isinstance(x, dict) else {"x": np.asarray(x)}
        if isinstance(y, dict):  # (x, {"y": ..., "y_lengths": ...})
            labels, targets = _pop_labels({k: np.asarray(v) for k, v in y.items()})
        else:
            labels, targets = (None if y is None else np.asarray(y)), {}
        ds = Dataset(inputs, labels, targets)
    elif isinstance(data, dict):
        arrays = {k: np.asarray(v) for k, v in data.items()}
        labels, targets = _pop_labels(arrays)
        ds = Dataset(arrays, labels, targets)
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
    check_labels(ds, role, task)
    return ds


def check_labels(ds: Dataset, role: str, task: Optional[str] = None) -> None:
    """Labels `y` fit the task (one row per sample; the scorer's format, agent/core/quality_tasks.py)."""
    from edgefleet.agent.core.quality import QualityError, check_task

    if task is None:
        from edgefleet.sdk.build.measure import build_task

        task = build_task()
    try:
        task = check_task(task)
    except QualityError as exc:
        raise DataError(exc.reason) from None
    labels = ds.labels
    for key, target in ds.targets.items():
        if target.ndim == 0 or len(target) != len(ds):
            raise DataError(
                f"{role} training targets {key!r} must have one row per sample ({len(ds)}); got shape {target.shape}"
            )
    if labels is None:
        if "y_lengths" in ds.targets:
            raise DataError(f"{role} data has 'y_lengths' but no labels 'y'; save the CTC tokens as 'y'")
        return
    if task == "classification" or (task == "auto" and labels.ndim <= 1):
        _check_class_ids(labels, len(ds), role, task)
        return
    if labels.ndim == 0 or len(labels) != len(ds):
        raise DataError(
            f"{role} labels 'y' must have one row per sample ({len(ds)}); got shape {labels.shape}"
        )
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        raise DataError(f"{role} labels 'y' must be numbers; got {labels.dtype}")
    if task == "auto" and _one_hot(labels):
        # `auto` would score these as CTC tokens or embeddings, or take their first column as the class.
        raise DataError(
            f"{role} labels 'y' of shape {labels.shape} look one-hot; save class indices (y.argmax(axis=1)), "
            "or pass --task for detection, CTC or embedding labels"
        )
    if task in ("detection", "ctc"):
        from edgefleet.agent.core.quality_tasks import TaskDataError, ground_truth, label_tokens

        try:
            if task == "detection":
                ground_truth(labels)
            else:
                label_tokens(labels)
        except TaskDataError as exc:
            raise DataError(f"{role} data: {exc.reason} (--task {task})") from None
    elif task == "embedding" and (labels.ndim < 2 or not np.issubdtype(labels.dtype, np.floating)):
        raise DataError(
            f"{role} labels 'y' for --task embedding must be float target vectors shaped like the model's "
            f"first output (N, ..., D); got {labels.dtype} {labels.shape}"
        )


def _one_hot(labels: np.ndarray) -> bool:
    """Whether (N, C > 1) labels hold one 1 per row and 0 elsewhere."""
    if labels.ndim != 2 or labels.shape[1] < 2:
        return False
    return bool(np.isin(labels, (0, 1)).all() and (labels.sum(axis=1) == 1).all())


def _check_class_ids(labels: np.ndarray, rows: int, role: str, task: str) -> None:
    """Classification labels: one integer class per sample (the old, and `auto`'s 1-D, format)."""
    if labels.ndim != 1 or len(labels) != rows:
        hint = ""
        if labels.ndim == 2 and len(labels) == rows:
            hint = " (one-hot? save y.argmax(axis=1))"
        if labels.ndim > 1:
            hint += "; detection (N, G, 5), CTC (N, L) or embedding labels need that --task"
        raise DataError(
            f"{role} labels 'y' must be one integer per sample ({rows}); got shape {labels.shape}{hint}"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{role} labels 'y' must be integers (class indices); got {labels.dtype}")


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
    labels, targets = _pop_labels(arrays)
    if "x" in arrays:
        return Dataset({"x": arrays["x"]}, labels, targets)
    if not arrays:
        raise DataError(
            f"{role} file {path} has no array 'x'; save the inputs as numpy.savez(path, x=..., y=...)"
        )
    # Several named inputs (e.g. input_ids, attention_mask) are accepted; they are checked by name.
    return Dataset(arrays, labels, targets)


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
    return replace(ds, inputs=fitted)


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
