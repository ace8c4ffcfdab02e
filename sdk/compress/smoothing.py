"""SmoothQuant-style activation smoothing for ONNX MatMuls, chosen per activation by simulation.

Dynamic INT8 quantizes a MatMul's activation per tensor, so a few outlier channels set the range and
crush the rest. For a MatMul X·W, X·W = (X·diag(1/s))·(diag(s)·W): scaling channel j of X down by
s_j = max|X_j|^α / max|W_j|^(1−α) and row j of W up by the same factor moves range from the
activation into the (per-channel quantized) weight (Xiao et al., SmoothQuant). It helps some layers
and hurts others (measured on MiniLM: the FFN input gains, the FFN output loses), so each activation
group — the MatMuls that read one tensor — is smoothed only when simulating its INT8 on calibration
data says it lowers the distortion. The fp32 result is unchanged up to float rounding; one Mul per
smoothed group is the runtime cost.

Public API:
    activation_groups(model) -> dict[str, list[str]]        activation tensor → MatMul node names
    activation_absmax(model, batches, tensors) -> dict[str, np.ndarray]
    smooth(model, groups, absmax, alpha=0.5) -> onnx.ModelProto
    choose_smoothing(model, calib, *, alpha=0.5, min_gain=0.1, ...) -> SmoothingPlan
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from edgefleet.sdk.compress.onnx_fakequant import FakeQuantGraph, batch_cosines, make_session, run_session
from edgefleet.sdk.compress.sensitivity import Progress

if TYPE_CHECKING:
    import onnx

Batches = Sequence[dict[str, np.ndarray]]


def activation_groups(model: onnx.ModelProto) -> dict[str, list[str]]:
    """Float activations read by MatMuls with a constant 2-D weight, with those MatMuls' names."""
    from onnx import TensorProto

    inits = {i.name: i for i in model.graph.initializer}
    groups: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[0] in inits:
            continue
        weight = inits.get(node.input[1])
        if weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT:
            groups.setdefault(node.input[0], []).append(node.name)
    return groups


def activation_absmax(
    model: onnx.ModelProto,
    batches: Batches,
    tensors: Sequence[str],
    mask_input: Optional[str] = "attention_mask",
) -> dict[str, np.ndarray]:
    """Per-channel max |value| of each named intermediate tensor over the batches (padding masked)."""
    import onnx
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {o.name for o in probe.graph.output}
    for name in tensors:
        if name not in existing:
            probe.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = make_session(probe.SerializeToString())
    names = [o.name for o in session.get_outputs()]
    absmax: dict[str, np.ndarray] = {}
    for feeds in batches:
        outputs = dict(zip(names, run_session(session, feeds)))
        mask = feeds.get(mask_input) if mask_input else None
        for name in tensors:
            value = np.abs(outputs[name])
            if mask is not None and value.ndim == 3 and mask.shape == value.shape[:2]:
                value = value[mask.astype(bool)]
            flat = value.reshape(-1, value.shape[-1]).max(axis=0)
            absmax[name] = np.maximum(absmax[name], flat) if name in absmax else flat
    return absmax


def smooth(
    model: onnx.ModelProto,
    groups: dict[str, list[str]],
    absmax: dict[str, np.ndarray],
    alpha: float = 0.5,
) -> onnx.ModelProto:
    """A copy of `model` where each activation in `groups` is divided by s and its weights' rows × s."""
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {i.name: i for i in out.graph.initializer}
    nodes = {n.name: n for n in out.graph.node}
    insert_before: dict[str, onnx.NodeProto] = {}
    for activation, members in groups.items():
        weights = [numpy_helper.to_array(inits[nodes[m].input[1]]) for m in members]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        scale = np.clip(absmax[activation], 1e-5, None) ** alpha / np.clip(wmax, 1e-5, None) ** (1 - alpha)
        scale = scale.astype(np.float32)
        inv_name, smoothed = f"{activation}__smooth_inv", f"{activation}__smoothed"
        out.graph.initializer.append(numpy_helper.from_array((1.0 / scale).astype(np.float32), inv_name))
        mul = helper.make_node("Mul", [activation, inv_name], [smoothed], name=f"{activation}__smooth")
        insert_before[members[0]] = mul
        for member, weight in zip(members, weights):
            node = nodes[member]
            # a weight shared with another node must not change under it: give this node its own copy
            new_name = f"{node.input[1]}__smoothed_{member}"
            out.graph.initializer.append(
                numpy_helper.from_array((weight * scale[:, None]).astype(np.float32), new_name)
            )
            node.input[1] = new_name
            node.input[0] = smoothed
    ordered = []
    for node in out.graph.node:
        if node.name in insert_before:
            ordered.append(insert_before[node.name])
        ordered.append(node)
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    used = {name for n in out.graph.node for name in n.input}
    kept = [i for i in out.graph.initializer if i.name in used]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    return out


@dataclass
class SmoothingPlan:
    """Which activation groups to smooth, the distortion with and without, and the smoothed model."""

    model: onnx.ModelProto
    smoothed: list[str]
    alpha: float
    distortion: dict[str, tuple[float, float]] = field(default_factory=dict)  # group → (plain, smoothed)


def choose_smoothing(
    model: onnx.ModelProto,
    calib: Batches,
    *,
    alpha: float = 0.5,
    min_gain: float = 0.1,
    mask_input: Optional[str] = "attention_mask",
    threads: int = 2,
    progress: Progress = None,
) -> SmoothingPlan:
    """Smooth each activation group whose simulated INT8 distortion drops by at least `min_gain` (10 %)."""
    batches = list(calib)
    groups = activation_groups(model)
    absmax = activation_absmax(model, batches, list(groups), mask_input)
    base = FakeQuantGraph(model, threads=threads)
    reference = base.run_batches(set(), batches)
    chosen: dict[str, list[str]] = {}
    distortion: dict[str, tuple[float, float]] = {}

    def loss(graph: FakeQuantGraph, nodes: set[str]) -> float:
        cos = batch_cosines(reference, graph.run_batches(nodes, batches), batches, mask_input)
        return float(1.0 - cos.mean())

    for index, (activation, members) in enumerate(groups.items()):
        plain = loss(base, set(members))
        trial = FakeQuantGraph(smooth(model, {activation: members}, absmax, alpha), threads=threads)
        smoothed = loss(trial, set(members))
        distortion[activation] = (plain, smoothed)
        if smoothed < (1.0 - min_gain) * plain:
            chosen[activation] = members
        if progress is not None:
            progress(f"smoothing {index + 1}/{len(groups)}", (index + 1) / len(groups))
    return SmoothingPlan(smooth(model, chosen, absmax, alpha), list(chosen), alpha, distortion)
