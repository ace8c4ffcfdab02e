"""Write the chosen candidate as a signed bundle: model, eval.npz for the device, manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from edgefleet.sdk.build.candidate import Candidate
from edgefleet.sdk.build.errors import BuildError
from edgefleet.sdk.build.measure import (
    evaluate,
    run_model,
)
from edgefleet.sdk.build.model_io import (
    Dataset,
)

BUNDLE_EVAL_SAMPLES = 256


def write_eval_npz(
    path: Path,
    eval_ds: Dataset,
    reference: Optional[list[np.ndarray]],
    input_names: list[str],
    output_names: Sequence[str] = (),
) -> Dataset:
    """eval.npz for the device's health check: inputs by name, plus labels `y` or fp32 outputs `reference`."""
    n = min(len(eval_ds), BUNDLE_EVAL_SAMPLES)
    arrays = {name: v[:n] for name, v in zip(input_names, eval_ds.inputs.values())}
    if eval_ds.labels is not None:
        arrays["y"] = eval_ds.labels[:n]
    elif reference is not None:
        # `reference` is the first output (what older agents read), `reference:NAME` each further one.
        arrays["reference"] = reference[0][:n]
        for out_name, ref in zip(list(output_names)[1:], reference[1:]):
            arrays["reference:" + out_name] = ref[:n]
    with path.open("wb") as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
    return Dataset(
        {name: v[:n] for name, v in zip(input_names, eval_ds.inputs.values())},
        None if eval_ds.labels is None else eval_ds.labels[:n],
    )


def write_bundle(
    out_dir: Path,
    chosen: Candidate,
    prof: Any,
    eval_ds: Dataset,
    reference: Optional[list[np.ndarray]],
    report: dict[str, Any],
    private_key: Any,
    name: str,
    work: Path,
    version: Optional[int] = None,
) -> Path:
    """Sign and write the bundle; `create_bundle` stages it beside `out_dir` and renames it into place."""
    from edgefleet.converters.runners import open_runner
    from edgefleet.sdk.build.manifest_fields import manifest_fields_for
    from edgefleet.sdk.trust.bundle import BundleError, create_bundle
    from edgefleet.sdk.trust.keys import KeysError, load_private_key

    if chosen.path is None:
        raise BuildError(f"the chosen candidate {chosen.id} has no model file")
    if private_key is None or isinstance(private_key, (str, Path)):
        try:
            private_key = load_private_key(private_key)
        except KeysError as exc:
            raise BuildError(f"cannot sign the bundle: {exc.reason}") from exc
    if chosen.path.suffix == ".onnx":
        from edgefleet.converters.onnx_portable import drop_unused_opset_imports

        # Unused imports of new opsets (saved by the host's onnxruntime) make older device runtimes refuse it.
        drop_unused_opset_imports(chosen.path)
    runner = open_runner(chosen.path)
    eval_path = work / "eval.npz"
    subset = write_eval_npz(
        eval_path, eval_ds, reference, [s.name for s in runner.inputs], [s.name for s in runner.outputs]
    )
    subset_reference = None if reference is None else [r[: len(subset)] for r in reference]
    subset_quality = evaluate(
        run_model(runner, subset.inputs), labels=subset.labels, reference=subset_reference
    )
    # The health floor is the fp32 model's score on the same rows less the build's one budget.
    reference_quality = evaluate(subset_reference or [], labels=subset.labels, reference=subset_reference)
    fields = manifest_fields_for(
        chosen,
        prof,
        runner,
        name=name,
        subset_quality=subset_quality,
        reference_quality=reference_quality,
        max_accuracy_drop=float(report["budget"]["max_accuracy_drop"]),
        max_p95_ms=getattr(prof, "p95_latency_ms", None),
    )
    if version is not None:
        fields["version"] = int(version)  # one release number for every profile's bundle (--version)
    try:
        return create_bundle(
            out_dir,
            model_path=chosen.path,
            eval_npz_path=eval_path,
            manifest_fields=fields,
            private_key=private_key,
            report=report,
        )
    except BundleError as exc:
        raise BuildError(f"writing the bundle failed: {exc.reason}") from exc
