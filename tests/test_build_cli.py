"""`edgefleet build` on the command line: JSON report, bundle, table, and clear errors without tracebacks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from typer.testing import CliRunner  # noqa: E402

from edgefleet.converters import CONVERTERS  # noqa: E402
from edgefleet.sdk.cli import app  # noqa: E402


def _profiles_available() -> bool:
    try:
        from edgefleet.device_profiles import load_profile

        load_profile("rpi4b")
    except Exception:
        return False
    return True


needs_profiles = pytest.mark.skipif(
    not _profiles_available(), reason="built-in device profiles are not installed"
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    ).eval()
    model = root / "net.onnx"
    CONVERTERS.get("torch-onnx")().convert(net, model, {"input": np.zeros((2, 1, 8, 8), np.float32)})
    rng = np.random.default_rng(0)
    np.savez(root / "eval.npz", x=rng.random((64, 1, 8, 8), dtype=np.float32))
    np.savez(root / "no_x.npz", images=rng.random((8, 1, 8, 8), dtype=np.float32))
    (root / "corrupt.onnx").write_bytes(b"\x12\x34corrupt" * 20)
    from edgefleet.sdk.trust.keys import init_keys

    files = {
        "model": model,
        "eval": root / "eval.npz",
        "no_x": root / "no_x.npz",
        "corrupt": root / "corrupt.onnx",
    }
    files["key"] = init_keys(root / "keys").private_path
    files["root"] = root
    return files


def _run(*args: str) -> tuple[int, str]:
    code, output, _ = _run3(*args)
    return code, output


def _run3(*args: str) -> tuple[int, str, str]:
    """(exit code, stdout+stderr, stdout alone)."""
    result = CliRunner().invoke(app, ["build", *args])
    return result.exit_code, result.output, result.stdout


@needs_profiles
def test_build_json_writes_bundle(files: dict[str, Path]) -> None:
    out = files["root"] / "bundle"
    code, output, stdout = _run3(
        str(files["model"]), "--profile", "rpi4b", "--eval", str(files["eval"]), "--max-accuracy-drop", "0.02",
        "--only", "onnx-int8-dynamic", "--key", str(files["key"]), "-o", str(out), "--json",
    )  # fmt: skip
    assert code == 0, output
    report = json.loads(stdout)
    assert report["profile"]["name"] == "rpi4b"
    assert {c["id"] for c in report["candidates"]} == {"onnx-fp32", "onnx-int8-dynamic"}
    assert (out / "manifest.json").is_file()
    assert json.loads((out / "report.json").read_text())["chosen"] == report["chosen"]


@needs_profiles
def test_build_prints_table(files: dict[str, Path]) -> None:
    code, output = _run(
        str(files["model"]), "--profile", "rpi4b", "--eval", str(files["eval"]), "--only", "onnx-fp32-opt",
        "--key", str(files["key"]),
    )  # fmt: skip
    assert code == 0, output
    assert "onnx-fp32" in output
    assert "chosen:" in output


def test_npz_without_x_is_a_clear_error(files: dict[str, Path]) -> None:
    code, output = _run(str(files["model"]), "--profile", "rpi4b", "--eval", str(files["no_x"]))
    assert code != 0
    assert "Traceback" not in output
    assert "no array 'x'" in output


def test_corrupt_model_is_a_clear_error(files: dict[str, Path]) -> None:
    code, output = _run(str(files["corrupt"]), "--profile", "rpi4b", "--eval", str(files["eval"]))
    assert code == 1
    assert "Traceback" not in output
    assert "error:" in output


def test_unknown_profile_is_a_clear_error(files: dict[str, Path]) -> None:
    code, output = _run(str(files["model"]), "--profile", "no-such-board", "--eval", str(files["eval"]))
    assert code == 1
    assert "no-such-board" in output
    assert "Traceback" not in output


@needs_profiles
def test_plugin_that_cannot_import_is_listed_unavailable(
    files: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # prepare: a compression module whose import fails and an optional package that is missing
    monkeypatch.setitem(sys.modules, "edgefleet.sdk.compress.distill", None)
    monkeypatch.setitem(sys.modules, "litert_torch", None)
    out = files["root"] / "bundle-unavailable"
    # act
    code, output = _run(
        str(files["model"]), "--profile", "rpi4b", "--eval", str(files["eval"]), "--only", "onnx-fp32-opt",
        "--key", str(files["key"]), "-o", str(out),
    )  # fmt: skip
    # assert: printed under the table and recorded in report.json, each with its reason
    assert code == 0, output
    assert "edgefleet.sdk.compress.distill (module): unavailable: ModuleNotFoundError" in output
    assert "torch-tflite (converter): unavailable: needs litert_torch" in output
    assert "tflite-int8 (compressor): unavailable: needs litert_torch" in output
    report = json.loads((out / "report.json").read_text())
    listed = {u["name"]: u for u in report["unavailable"]}
    assert listed["edgefleet.sdk.compress.distill"]["kind"] == "module"
    assert "halted" in listed["edgefleet.sdk.compress.distill"]["reason"]
    assert listed["torch-tflite"]["kind"] == "converter"
    assert "litert_torch" in listed["tflite-int8"]["reason"]
