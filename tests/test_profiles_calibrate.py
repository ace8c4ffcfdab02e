"""`edgefleet profiles calibrate`: the fleet's reported latencies fit a profile's [efficiency] table."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from edgefleet.device_profiles import ProfileError, load_profile
from edgefleet.sdk.build.estimate import estimate_latency
from edgefleet.sdk.cli import app

runner = CliRunner()
# What the "devices" really achieve: the truth the recorded telemetry is generated from.
TRUTH = {"conv": 0.2, "matmul": 0.6, "elementwise": 0.12}


def _save(path: Path, nodes: list[Any], x_shape: list[int], inits: list[Any]) -> Path:
    graph = helper.make_graph(
        nodes,
        path.stem,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _w(name: str, shape: tuple[int, ...]) -> Any:
    return numpy_helper.from_array(np.full(shape, 0.01, dtype=np.float32), name)


@pytest.fixture()
def models(tmp_path: Path) -> dict[str, Path]:
    """Three known models, each dominated by one op class: a CNN, an MLP, an activation chain."""
    cnn = _save(
        tmp_path / "cnn.onnx",
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [1, 32, 32, 32],
        [_w("w", (32, 32, 3, 3))],
    )
    mlp = _save(
        tmp_path / "mlp.onnx",
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])],
        [1, 64, 256],
        [_w("w1", (256, 512)), _w("w2", (512, 256))],
    )
    act = _save(
        tmp_path / "act.onnx",
        [helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["x", "s"], ["y"])],
        [1, 64, 128, 128],
        [],
    )
    return {"cnn": cnn, "mlp": mlp, "act": act}


def _true_latency(path: Path) -> float:
    truth = dataclasses.replace(load_profile("rpi4b"), efficiency=TRUTH)
    return estimate_latency(path, truth).estimate_ms


def _telemetry(models: dict[str, Path]) -> list[dict[str, Any]]:
    """Rows as devices report them: three rpi4b devices per model (±3 %), plus rows the fit must skip."""
    rows: list[dict[str, Any]] = []
    for name, path in models.items():
        true = _true_latency(path)
        for device, noise in (("pi-1", 0.97), ("pi-2", 1.0), ("pi-3", 1.03)):
            rows.append(
                {
                    "device_id": device,
                    "profile": "rpi4b",
                    "model_name": name,
                    "model_version": 3,
                    "count": 200,
                    "p50_ms": true * noise,
                    "p95_ms": true * noise * 1.3,
                }
            )
    # a v2 telemetry message (typed parts) counts too
    rows.append(
        {
            "device_id": "pi-4",
            "profile": "rpi4b",
            "model": {"name": "mlp", "version": 3},
            "latency": {"count": 50, "p50_ms": _true_latency(models["mlp"])},
        }
    )
    rows.append({"device_id": "jet-1", "profile": "jetson-orin-nano", "model_name": "cnn", "p50_ms": 0.001})
    rows.append({"device_id": "pi-1", "profile": "rpi4b", "model_name": "other", "p50_ms": 99.0})
    rows.append({"device_id": "pi-1", "profile": "rpi4b", "model_name": "cnn", "p50_ms": None})
    return rows


def _model_args(models: dict[str, Path]) -> list[str]:
    out: list[str] = []
    for name, path in models.items():
        out += ["--model", f"{name}={path}"]
    return out


def test_calibrate_fits_the_fleets_latencies(tmp_path: Path, models: dict[str, Path]) -> None:
    # prepare: recorded telemetry as a JSON export
    telemetry = tmp_path / "telemetry.json"
    telemetry.write_text(json.dumps(_telemetry(models)), encoding="utf-8")
    out = tmp_path / "rpi4b-fleet.toml"
    # act
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--telemetry",
            str(telemetry),
            *_model_args(models),
            "--out",
            str(out),
            "--json",
        ],
    )
    # assert: the written profile loads, its table is near the truth, its estimates near the reports
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    calibrated = load_profile(str(out))
    assert calibrated.name == "rpi4b" and calibrated.cores == 4
    for cls, value in TRUTH.items():
        assert calibrated.efficiency[cls] == pytest.approx(value, rel=0.15), cls
    for row in doc["models"]:
        assert 0.9 <= row["estimate_over_reported_after"] <= 1.1, row
    assert any(not 0.67 <= row["estimate_over_reported_before"] <= 1.5 for row in doc["models"])
    for path in models.values():
        reported = _true_latency(path)
        assert estimate_latency(path, calibrated).estimate_ms == pytest.approx(reported, rel=0.1)
    assert "profiles calibrate" in calibrated.sources["efficiency"]


def test_calibrate_reads_a_csv_export(tmp_path: Path, models: dict[str, Path]) -> None:
    telemetry = tmp_path / "telemetry.csv"
    rows = [r for r in _telemetry(models) if "model_name" in r]
    with telemetry.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=sorted({k for r in rows for k in r}))
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "fleet.toml"
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--telemetry",
            str(telemetry),
            *_model_args(models),
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "estimate/reported" in result.stdout
    assert load_profile(str(out)).efficiency["conv"] == pytest.approx(TRUTH["conv"], rel=0.15)


def test_calibrate_without_matching_telemetry_exits_2(tmp_path: Path, models: dict[str, Path]) -> None:
    telemetry = tmp_path / "telemetry.json"
    telemetry.write_text(json.dumps(_telemetry(models)), encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi5",
            "--telemetry",
            str(telemetry),
            *_model_args(models),
            "--out",
            str(tmp_path / "x.toml"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert "no telemetry row of profile 'rpi5'" in result.output
    assert not (tmp_path / "x.toml").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "cnn"], "must be KEY=VALUE"),
        (["--model", "cnn=/nonexistent.onnx"], "no such model file"),
        ([], "at least one --model"),
    ],
)
def test_calibrate_bad_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    telemetry = tmp_path / "t.json"
    telemetry.write_text("[]", encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--telemetry",
            str(telemetry),
            *args,
            "--out",
            str(tmp_path / "o.toml"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert message in result.output


def test_calibrate_refuses_telemetry_that_is_not_rows(tmp_path: Path, models: dict[str, Path]) -> None:
    telemetry = tmp_path / "t.json"
    telemetry.write_text('{"rows": 5}', encoding="utf-8")
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--telemetry",
            str(telemetry),
            *_model_args(models),
            "--out",
            str(tmp_path / "o.toml"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert "list of telemetry rows" in result.output


def _with_efficiency(tmp_path: Path, table: str) -> Path:
    text = Path(load_profile("rpi4b").path).read_text(encoding="utf-8")
    path = tmp_path / "eff.toml"
    path.write_text(
        text.replace("\n[sources]\n", f"\n[efficiency]\n{table}\n\n[sources]\n"), encoding="utf-8"
    )
    return path


def test_efficiency_table_loads_and_shows(tmp_path: Path) -> None:
    path = _with_efficiency(tmp_path, "conv = 0.25\nop_overhead_us = 3.0")
    profile = load_profile(str(path))
    assert dict(profile.efficiency) == {"conv": 0.25, "op_overhead_us": 3.0}
    assert profile.to_dict()["efficiency"] == {"conv": 0.25, "op_overhead_us": 3.0}
    result = runner.invoke(app, ["profiles", "show", str(path)], env={"COLUMNS": "250"})
    assert result.exit_code == 0 and "conv=0.25" in result.stdout


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("convs = 0.2", "unknown field 'efficiency.convs'"),
        ("conv = 0", "in (0, 4]"),
        ("conv = 'fast'", "in (0, 4]"),
    ],
)
def test_bad_efficiency_table_names_the_field(tmp_path: Path, table: str, message: str) -> None:
    with pytest.raises(ProfileError, match=message.replace("(", r"\(").replace("]", r"\]")):
        load_profile(str(_with_efficiency(tmp_path, table)))


# ----------------------------------------------------------------------------------------------
# calibrating straight from the fleet store


def _window(
    device: str, seq: int, profile: Optional[str], name: str, version: int, p50: Optional[float]
) -> Any:
    """One telemetry window as an agent sends it (v2 typed parts)."""
    from edgefleet.agent.core.events import Telemetry
    from edgefleet.agent.core.parts import Latency, ModelRef, Requests

    count = 0 if p50 is None else 200
    return Telemetry(
        device=device,
        seq=seq,
        ts=time.time() - 600 + seq,
        model=ModelRef(name, version),
        profile=profile,
        requests=Requests(count=count),
        latency=Latency(count=count, p50_ms=p50, p95_ms=None if p50 is None else p50 * 1.3),
    )


def _ingest(store: Any, fleet: str, messages: list[Any]) -> int:
    """Write messages as the host's ingest does: parse the wire form, flatten, one batch into the store."""
    from edgefleet.agent.core.events import Telemetry, parse_device_message
    from edgefleet.sdk.fleet.ingest import flatten_telemetry

    parsed = [parse_device_message(m.to_wire()) for m in messages]
    assert all(isinstance(m, Telemetry) for m in parsed)
    return int(store.add_telemetry(fleet, [flatten_telemetry(m) for m in parsed if isinstance(m, Telemetry)]))


def _add_bundle(store: Any, root: Path, name: str, version: int, profile: str, model: Optional[Path]) -> Path:
    """Register a bundle folder holding `model` as model.onnx (None: a path that is not on this host)."""
    folder = root / f"{name}-v{version}-{profile}"
    if model is not None:
        folder.mkdir(parents=True)
        shutil.copyfile(model, folder / "model.onnx")
    else:
        folder = root / "gone" / folder.name
    store.add_bundle(
        name=name,
        version=version,
        profile=profile,
        manifest_sha256=hashlib.sha256(f"{name}{version}{profile}".encode()).hexdigest(),
        path=str(folder),
        size_bytes=1,
        manifest={"name": name, "version": version, "model": {"file": "model.onnx", "format": "onnx"}},
    )
    return folder / "model.onnx"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty store: a SQLite file, or a fresh PostgreSQL database (`postgres` marker)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fleet.db'}"
        return
    from pg_support import fresh_database

    with fresh_database() as url:
        yield url


@pytest.fixture()
def fleet_store(store_url: str, tmp_path: Path, models: dict[str, Path]) -> tuple[str, dict[str, Path]]:
    """A fleet store holding recorded telemetry and bundles, written through the store's own calls."""
    from edgefleet.sdk.store import Store

    url = store_url
    store = Store(url)
    bundles = tmp_path / "bundles"
    files = {
        # cnn v3: built for rpi4b (that one is meant) and for the Jetson (another file: must not be used)
        "cnn": _add_bundle(store, bundles, "cnn", 3, "rpi4b", models["cnn"]),
        # mlp v3: only built for x86-64, the only bundle of that version
        "mlp": _add_bundle(store, bundles, "mlp", 3, "x86-64", models["mlp"]),
    }
    _add_bundle(store, bundles, "cnn", 3, "jetson-orin-nano", models["act"])
    _add_bundle(store, bundles, "cnn", 2, "rpi4b", None)  # its folder is gone: cnn v2 is skipped
    # pi-old's agent sends no profile in telemetry; its device row says rpi4b
    store.upsert_device("lab", "pi-old", profile="rpi4b")
    messages = []
    seq = 0
    for name, path in models.items():
        true = _true_latency(path)
        for device, noise in (("pi-1", 0.97), ("pi-2", 1.0), ("pi-3", 1.03), ("pi-old", 1.01)):
            seq += 1
            messages.append(
                _window(device, seq, None if device == "pi-old" else "rpi4b", name, 3, true * noise)
            )
    seq += 1
    messages += [
        _window("pi-1", seq, "rpi4b", "cnn", 2, 500.0),  # an old version without a model file here
        _window("pi-2", seq, "rpi4b", "cnn", 3, None),  # a window without requests: no p50
        _window("jet-1", seq, "jetson-orin-nano", "cnn", 3, 0.001),  # another profile
    ]
    assert _ingest(store, "lab", messages) == len(messages)
    _ingest(store, "other-fleet", [_window("pi-9", 1, "rpi4b", "ghost", 1, 5.0)])
    store.close()
    return url, files


def test_store_groups_latency_readings_by_profile_and_model_version(fleet_store: Any) -> None:
    from edgefleet.sdk.store import Store

    url, _ = fleet_store
    store = Store(url)
    try:
        groups = store.latency_readings("lab")
        rpi = store.latency_readings("lab", profile="rpi4b")
    finally:
        store.close()
    assert set(rpi) == {("rpi4b", n, 3) for n in ("cnn", "mlp", "act")} | {("rpi4b", "cnn", 2)}
    assert set(groups) == set(rpi) | {("jetson-orin-nano", "cnn", 3)}
    cnn = rpi[("rpi4b", "cnn", 3)]
    assert sorted(r.device_id for r in cnn) == ["pi-1", "pi-2", "pi-3", "pi-old"]  # pi-old by its device row
    assert all(r.count == 200 and r.p50_ms > 0 for r in cnn)


def test_calibrate_from_the_fleet_store(tmp_path: Path, models: dict[str, Path], fleet_store: Any) -> None:
    # prepare: act v3 has no bundle in the store: its file is given
    url, files = fleet_store
    out = tmp_path / "rpi4b-fleet.toml"
    # act
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--db",
            url,
            "--fleet",
            "lab",
            "--model",
            f"act:3={models['act']}",
            "--out",
            str(out),
            "--json",
        ],
    )
    # assert: the written profile loads, its table recovers the truth, each version used the right file
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    by_model = {row["model"]: row for row in doc["models"]}
    assert set(by_model) == {"cnn:3", "mlp:3", "act:3"}
    assert by_model["cnn:3"]["path"] == str(files["cnn"]) and by_model["cnn:3"]["reports"] == 4
    assert by_model["mlp:3"]["path"] == str(files["mlp"])
    assert any(line.startswith("cnn:2:") and "not on this host" in line for line in doc["skipped"])
    calibrated = load_profile(str(out))
    assert calibrated.name == "rpi4b"
    for cls, value in TRUTH.items():
        assert calibrated.efficiency[cls] == pytest.approx(value, rel=0.15), cls
    for path in models.values():
        assert estimate_latency(path, calibrated).estimate_ms == pytest.approx(_true_latency(path), rel=0.1)
    assert "fleet store" in calibrated.sources["efficiency"]


def test_calibrate_from_the_store_without_model_files_names_them(tmp_path: Path, fleet_store: Any) -> None:
    url, _ = fleet_store
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--db",
            url,
            "--fleet",
            "other-fleet",
            "--out",
            str(tmp_path / "o.toml"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert "ghost:1: no bundle of this version in the store" in result.output
    assert "--model NAME:VERSION=PATH" in result.output and not (tmp_path / "o.toml").exists()
    result = runner.invoke(
        app,
        ["profiles", "calibrate", "rpi5", "--db", url, "--fleet", "lab", "--out", str(tmp_path / "o.toml")],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2 and "no latency telemetry of profile 'rpi5'" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "sqlite:///{tmp}/missing.db"], "no fleet store at"),
        (["--db", "sqlite:///{tmp}/fleet.db", "--telemetry", "{tmp}/t.json"], "not both"),
    ],
)
def test_calibrate_store_arguments_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            *[a.format(tmp=tmp_path) for a in args],
            "--out",
            str(tmp_path / "o.toml"),
        ],
        env={"COLUMNS": "300"},
    )
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "missing.db").exists()


def test_calibrate_reads_the_store_edgefleet_db_names(
    tmp_path: Path, models: dict[str, Path], fleet_store: Any
) -> None:
    # prepare: no --db and no --telemetry: the store `edgefleet serve` uses (EDGEFLEET_DB here)
    url, _ = fleet_store
    out = tmp_path / "env.toml"
    # act
    result = runner.invoke(
        app,
        [
            "profiles",
            "calibrate",
            "rpi4b",
            "--fleet",
            "lab",
            "--model",
            f"act:3={models['act']}",
            "--out",
            str(out),
        ],
        env={"EDGEFLEET_DB": url, "COLUMNS": "300"},
    )
    # assert: the fit ran on the store's telemetry; the version without a model file is named on stderr
    assert result.exit_code == 0, result.output
    assert "skipped cnn:2: its stored bundle's model file is not on this host" in result.stderr
    assert "cnn:3: reported" in result.stdout
    assert load_profile(str(out)).efficiency["matmul"] == pytest.approx(TRUTH["matmul"], rel=0.15)
