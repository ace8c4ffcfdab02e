"""Prepare a federated task from a bundle: find the model's head in the ONNX graph and expose its features.

The head is the last linear layer that produces the output: a `Gemm`, or a `MatMul` followed by an `Add`
(optionally followed by a Softmax or Identity), or the layer whose weight and bias `--head` names. Its
input is the backbone's feature tensor. Devices compute those features through their own runtime, so
the model they serve must offer the tensor as an output: `prepare_model` adds it (after the model's
own outputs, so apps, health checks and feedback still read the first output). All of this runs on the
host with `onnx`; the device never needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgefleet.sdk.errors import EdgefleetError

FEATURE_OUTPUT = "edgefleet_features"
PASS_THROUGH = ("Softmax", "Identity", "LogSoftmax")


class FederatedError(EdgefleetError):
    """A federated task cannot run; the message names the problem and the fix."""


@dataclass(frozen=True)
class HeadSpec:
    """Where the head sits in the graph: its weight and bias initializers and the feature tensor it reads."""

    node: str
    weight_name: str
    bias_name: str
    trans_b: bool
    feature: str
    output: str
    weight: np.ndarray  # (features, classes), whatever the layout in the graph
    bias: np.ndarray  # (classes,)

    @property
    def size(self) -> int:
        """Numbers in the head: the length of every update."""
        return int(self.weight.size + self.bias.size)


@dataclass
class Task:
    """A bundle ready for federated rounds: its manifest, prepared model and head."""

    bundle_dir: Path
    manifest: dict[str, Any]
    model_path: Path
    input_name: str
    head: HeadSpec
    eval_path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The model's name."""
        return str(self.manifest["name"])

    @property
    def version(self) -> int:
        """The bundle's version: what devices must serve to take part."""
        return int(self.manifest["version"])

    @property
    def profile(self) -> str:
        """The device profile the bundle targets."""
        return str(self.manifest.get("target", {}).get("profile", ""))


def _initializers(model: Any) -> dict[str, Any]:
    return {t.name: t for t in model.graph.initializer}


def _attr(node: Any, name: str, default: Any) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def find_head(model: Any, head: Sequence[str] | None = None) -> HeadSpec:
    """The head of `model`: the last Gemm / MatMul+Add producing the first output, or the one `head` names."""
    from onnx import numpy_helper

    inits = _initializers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    output = model.graph.output[0].name
    if head:
        wanted = set(head)
        missing = wanted - set(inits)
        if missing:
            raise FederatedError(
                f"--head names {sorted(missing)}, which are not weights of the model; its weights are "
                f"{sorted(inits)[:20]}"
            )
        candidates = [n for n in model.graph.node if wanted & set(n.input)]
        if not candidates:
            raise FederatedError(f"no layer of the model uses {sorted(wanted)}")
        node = candidates[-1]
    else:
        node = producers.get(output)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producers.get(node.input[0])
        if node is None:
            raise FederatedError(
                "the model's first output comes from no layer; name the head with --head W,B"
            )
    if node.op_type == "Gemm":
        if _attr(node, "transA", 0) or _attr(node, "alpha", 1.0) != 1.0 or _attr(node, "beta", 1.0) != 1.0:
            raise FederatedError(
                f"head {node.name!r}: a Gemm with transA, alpha or beta != 1 is not supported"
            )
        if len(node.input) < 3 or node.input[1] not in inits or node.input[2] not in inits:
            raise FederatedError(f"head {node.name!r}: its weight and bias must be constants of the model")
        trans_b = bool(_attr(node, "transB", 0))
        w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).reshape(-1)
        weight = w.T if trans_b else w
        return HeadSpec(
            node.name, node.input[1], node.input[2], trans_b, node.input[0], node.output[0], weight, b
        )
    if node.op_type == "Add":
        bias_name = next((i for i in node.input if i in inits), None)
        matmul = next(
            (producers[i] for i in node.input if i in producers and producers[i].op_type == "MatMul"), None
        )
        if bias_name is None or matmul is None or matmul.input[1] not in inits:
            raise FederatedError(
                f"head {node.name!r}: an Add must add a constant bias to a MatMul with a constant weight"
            )
        w = numpy_helper.to_array(inits[matmul.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(inits[bias_name]).astype(np.float32).reshape(-1)
        return HeadSpec(node.name, matmul.input[1], bias_name, False, matmul.input[0], node.output[0], w, b)
    raise FederatedError(
        f"the layer producing the output is a {node.op_type}, not a Gemm or MatMul + Add; name the head's "
        "weight and bias with --head W,B"
    )


def check_head(spec: HeadSpec) -> None:
    """Refuse heads the device trainer cannot take (shapes that do not agree)."""
    if spec.weight.ndim != 2 or spec.bias.shape != (spec.weight.shape[1],):
        raise FederatedError(
            f"head weight {spec.weight.shape} and bias {spec.bias.shape} do not form a linear layer"
        )


def prepare_model(model: Any, spec: HeadSpec) -> Any:
    """A copy of `model` whose graph also outputs the head's input features (named FEATURE_OUTPUT)."""
    import onnx
    from onnx import TensorProto, helper

    prepared = onnx.ModelProto()
    prepared.CopyFrom(model)
    names = [o.name for o in prepared.graph.output]
    if FEATURE_OUTPUT in names:
        return prepared
    prepared.graph.node.append(
        helper.make_node("Identity", [spec.feature], [FEATURE_OUTPUT], name="edgefleet_features")
    )
    first = prepared.graph.output[0].type.tensor_type.shape.dim
    batch = first[0].dim_param or (first[0].dim_value or "N") if len(first) else "N"
    prepared.graph.output.append(
        helper.make_tensor_value_info(FEATURE_OUTPUT, TensorProto.FLOAT, [batch, int(spec.weight.shape[0])])
    )
    onnx.checker.check_model(prepared)
    return prepared


def has_features(model: Any) -> bool:
    """Whether the model already outputs FEATURE_OUTPUT (a bundle `--prepare` made, or a federated result)."""
    return FEATURE_OUTPUT in [o.name for o in model.graph.output]


def load_task(bundle_dir: Path, *, head: Sequence[str] | None = None, eval_path: Path | None = None) -> Task:
    """Read an unpacked bundle (its manifest and model) into a Task; the model must expose its features."""
    import onnx

    manifest = json.loads((bundle_dir / "manifest.json").read_bytes())
    model_info = manifest.get("model", {})
    if model_info.get("format") != "onnx":
        raise FederatedError(
            f"{manifest.get('name')} v{manifest.get('version')} is a {model_info.get('format')} bundle; "
            "federated fine-tuning trains ONNX models: build the bundle with --format onnx"
        )
    model_path = bundle_dir / model_info["file"]
    model = onnx.load(str(model_path))
    spec = find_head(model, head)
    check_head(spec)
    if not has_features(model):
        raise FederatedError(
            f"{manifest['name']} v{manifest['version']} does not output its features, so devices cannot "
            "train its head: make a federation-ready bundle with `edgefleet federate BUNDLE --prepare -o OUT`, "
            "deploy it, then federate that bundle"
        )
    inputs = manifest.get("inputs") or [{"name": model.graph.input[0].name}]
    if len(inputs) != 1:
        raise FederatedError("federated fine-tuning needs a model with one input")
    eval_file = manifest.get("eval", {}).get("file")
    default_eval = bundle_dir / eval_file if eval_file else None
    return Task(
        bundle_dir=bundle_dir,
        manifest=manifest,
        model_path=model_path,
        input_name=str(inputs[0]["name"]),
        head=spec,
        eval_path=eval_path or default_eval,
    )


def features_of(model_path: Path, input_name: str, x: np.ndarray) -> np.ndarray:
    """The feature output of a prepared model for rows `x` (host-side eval), via onnxruntime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    dtype = np.float32
    out = session.run([FEATURE_OUTPUT], {input_name: np.asarray(x, dtype=dtype)})[0]
    return np.asarray(out, dtype=np.float64).reshape(len(x), -1)


__all__ = [
    "FEATURE_OUTPUT",
    "FederatedError",
    "HeadSpec",
    "Task",
    "check_head",
    "features_of",
    "find_head",
    "has_features",
    "load_task",
    "prepare_model",
]
