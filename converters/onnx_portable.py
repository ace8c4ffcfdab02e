"""ONNX files an older device runtime accepts: drop the opset imports no node uses.

onnxruntime's optimizer and quantizer on the host (e.g. 1.32) save models importing every domain they
know (`ai.onnx.ml` 5, `ai.onnx.preview`, `com.microsoft.nchwc`, ...), used or not. An older onnxruntime on
a device (1.16, the agent's floor and the last one for some Jetsons) refuses a model that imports an opset
newer than it knows ("Opset 5 is under development ... official support for domain ai.onnx.ml is till
opset 3") even when no node uses that domain. Dropping the unused imports changes no computation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _used_domains(graph: Any, out: set[str]) -> None:
    """Collect the domain of every node in `graph` and in its subgraphs (If / Loop / Scan bodies)."""
    for node in graph.node:
        out.add(node.domain or "")
        for attr in node.attribute:
            if attr.HasField("g"):
                _used_domains(attr.g, out)
            for sub in attr.graphs:
                _used_domains(sub, out)


def drop_unused_opset_imports(path: Path) -> list[str]:
    """Rewrite the ONNX file at `path` without opset imports no node or function uses; the dropped domains."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    used = {"", "ai.onnx"}  # the default domain stays: it fixes the opset of the standard operators
    _used_domains(model.graph, used)
    for function in model.functions:
        used.add(function.domain or "")
        for node in function.node:
            used.add(node.domain or "")
    keep = [o for o in model.opset_import if (o.domain or "") in used]
    dropped = sorted(o.domain for o in model.opset_import if (o.domain or "") not in used)
    if dropped:
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.save(model, str(path))
    return dropped
