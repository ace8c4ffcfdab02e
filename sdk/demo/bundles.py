"""The demo's releases: a classifier with a label-map bug, and re-signing a bundle with a new version."""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet.sdk.demo.options import BAD_CLASSES

if TYPE_CHECKING:
    from torch import nn


def mislabeled_copy(model: nn.Module, classes: Sequence[int] = BAD_CLASSES) -> nn.Module:
    """A copy of a classifier whose last layer's rows for `classes` are rotated: a label-map bug.

    Every input of those classes is then predicted as another class of the set, so accuracy drops by
    about their share of the data, while everything else about the model stays the same.
    """
    import torch
    from torch import nn

    bad = copy.deepcopy(model)
    last = [m for m in bad.modules() if isinstance(m, nn.Linear)][-1]
    order = list(range(last.out_features))
    rotated = [*classes[1:], classes[0]]
    for target, source in zip(classes, rotated):
        order[target] = source
    with torch.no_grad():
        last.weight.copy_(last.weight[order].clone())
        if last.bias is not None:
            last.bias.copy_(last.bias[order].clone())
    return bad.eval()


def restamp(bundle_dir: Path, version: int, private_key: Any) -> None:
    """Re-sign a built bundle with `version`, so all profiles of one release carry the same version."""
    from edgefleet.agent.core.manifest import MANIFEST_FILE, REPORT_FILE
    from edgefleet.sdk.trust.bundle import create_bundle

    manifest = json.loads((bundle_dir / MANIFEST_FILE).read_text())
    fields = {k: v for k, v in manifest.items() if k not in ("files", "schema")}
    fields["version"] = int(version)
    report_path = bundle_dir / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else None
    with tempfile.TemporaryDirectory(prefix="edgefleet-restamp-") as tmp:
        model = Path(tmp) / manifest["model"]["file"]
        evalf = Path(tmp) / manifest["eval"]["file"]
        shutil.copyfile(bundle_dir / manifest["model"]["file"], model)
        shutil.copyfile(bundle_dir / manifest["eval"]["file"], evalf)
        create_bundle(
            bundle_dir,
            model_path=model,
            eval_npz_path=evalf,
            manifest_fields=fields,
            private_key=private_key,
            report=report,
        )
