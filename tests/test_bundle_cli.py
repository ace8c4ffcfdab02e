"""`edgefleet keys`, `inspect` and `bundle pack|unpack` from the command line."""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.trust.bundle import create_bundle
from edgefleet.sdk.trust.keys import load_private_key

runner = CliRunner()


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("EDGEFLEET_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def bundle(home: Path, tmp_path: Path) -> Path:
    done = runner.invoke(app, ["keys", "init", "--json"])
    assert done.exit_code == 0, done.output
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(2048))
    np.savez(tmp_path / "eval.npz", x=np.zeros((3, 4), np.float32), y=np.arange(3))
    return create_bundle(
        tmp_path / "out",
        model_path=model,
        eval_npz_path=tmp_path / "eval.npz",
        manifest_fields={
            "name": "tiny",
            "target": {"profile": "rpi4b"},
            "model": {"format": "onnx", "runtime": "onnxruntime", "opset": 17},
            "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 4]}],
            "outputs": [{"name": "y", "dtype": "float32", "shape": [None, 3]}],
            "eval": {"kind": "labels", "metric": "accuracy"},
            "metrics": {"accuracy": 0.97},
            "health": {"min_accuracy": 0.9, "max_p95_ms": 20},
        },
        private_key=load_private_key(home / "keys" / "fleet.key"),
    )


def test_keys_init_prints_the_public_key_and_id(home: Path) -> None:
    done = runner.invoke(app, ["keys", "init", "--json"])
    assert done.exit_code == 0, done.output
    info = json.loads(done.output)
    assert info["public_pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert len(info["keyid"]) == 64
    assert Path(info["private_key"]).stat().st_mode & 0o777 == 0o600
    again = runner.invoke(app, ["keys", "init"])
    assert again.exit_code != 0
    assert "--force" in again.output


def test_keys_init_with_passphrase_env(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_PW", "pw")
    done = runner.invoke(app, ["keys", "init", "--passphrase-env", "FLEET_PW", "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["encrypted"] is True
    missing = runner.invoke(
        app, ["keys", "init", "--dir", str(home / "k2"), "--passphrase-env", "NOPE_UNSET"]
    )
    assert missing.exit_code != 0
    assert "NOPE_UNSET" in missing.output


def test_inspect_good_bundle_says_verified(bundle: Path, home: Path) -> None:
    done = runner.invoke(app, ["inspect", str(bundle), "--key", str(home / "keys" / "fleet.pub")])
    assert done.exit_code == 0, done.output
    assert "VERIFIED" in done.output
    assert "tiny" in done.output
    as_json = runner.invoke(app, ["inspect", str(bundle), "--json"])
    info = json.loads(as_json.output)
    assert info["verified"] is True
    assert info["manifest"]["metrics"] == {"accuracy": 0.97}
    assert {f["path"] for f in info["files"]} == {"model.onnx", "eval.npz"}


def test_inspect_tampered_bundle_says_so_plainly(bundle: Path) -> None:
    data = bytearray((bundle / "model.onnx").read_bytes())
    data[0] ^= 0xFF
    (bundle / "model.onnx").write_bytes(bytes(data))
    done = runner.invoke(app, ["inspect", str(bundle)])
    assert done.exit_code == 1
    assert "TAMPERED: file-hash-mismatch" in done.output
    info = json.loads(runner.invoke(app, ["inspect", str(bundle), "--json"]).output)
    assert info["verified"] is False and info["code"] == "file-hash-mismatch"


def test_inspect_with_a_foreign_key_says_untrusted(bundle: Path, tmp_path: Path) -> None:
    runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "other")])
    done = runner.invoke(app, ["inspect", str(bundle), "--key", str(tmp_path / "other" / "fleet.pub")])
    assert done.exit_code == 1
    assert "TAMPERED: untrusted-key" in done.output


def test_pack_unpack_round_trip_and_inspect_the_tar(bundle: Path, tmp_path: Path) -> None:
    tar = tmp_path / "b.tar"
    assert runner.invoke(app, ["bundle", "pack", str(bundle), str(tar)]).exit_code == 0
    assert runner.invoke(app, ["inspect", str(tar)]).exit_code == 0
    done = runner.invoke(app, ["bundle", "unpack", str(tar), str(tmp_path / "back"), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["files"] == sorted(p.name for p in bundle.iterdir())


def test_unpack_refuses_a_symlink(bundle: Path, tmp_path: Path) -> None:
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        tf.add(bundle / "manifest.json", arcname="manifest.json")
        link = tarfile.TarInfo("model.onnx")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/shadow"
        tf.addfile(link)
    done = runner.invoke(app, ["bundle", "unpack", str(tar), str(tmp_path / "x")])
    assert done.exit_code != 0
    assert "tar-link" in done.output
    assert not (tmp_path / "x").exists()


def test_keys_rotate_produces_a_statement_devices_accept(home: Path, tmp_path: Path) -> None:
    from edgefleet.agent.core.trust import TrustStore, load_rotation

    assert runner.invoke(app, ["keys", "init"]).exit_code == 0
    device = TrustStore.from_public_keys([home / "keys" / "fleet.pub"])
    assert runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "new")]).exit_code == 0
    out = tmp_path / "root-v2.json"
    done = runner.invoke(
        app,
        [
            "keys",
            "rotate",
            "--key",
            str(tmp_path / "new" / "fleet.pub"),
            "--sign-with",
            str(home / "keys" / "fleet.key"),
            "--sign-with",
            str(tmp_path / "new" / "fleet.key"),
            "-o",
            str(out),
        ],
    )
    assert done.exit_code == 0, done.output
    assert device.apply_root(*load_rotation(out.read_bytes())) == 2
    shown = json.loads(runner.invoke(app, ["keys", "show", "--json"]).output)
    assert shown["version"] == 2
    below = runner.invoke(
        app,
        [
            "keys",
            "rotate",
            "--key",
            str(home / "keys" / "fleet.pub"),
            "--sign-with",
            str(home / "keys" / "fleet.key"),
            "-o",
            str(tmp_path / "root-v3.json"),
        ],
    )
    assert below.exit_code != 0
    assert "rotation-threshold-not-met" in below.output
