"""Bundle upload through the API: verified against the fleet key before anything is stored."""

from __future__ import annotations

import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from edgefleet.sdk.server.app import create_app
from edgefleet.sdk.store import Store
from edgefleet.sdk.trust.bundle import create_bundle, pack
from edgefleet.sdk.trust.keys import init_keys, load_private_key

TAR = {"Content-Type": "application/x-tar"}


def fields(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "digits",
        "version": 7,
        "target": {"profile": "rpi4b", "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime", "opset": 17, "min_runtime_version": "1.16"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, 1, 8, 8]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, 10]}],
        "eval": {"kind": "labels", "metric": "accuracy"},
        "metrics": {"accuracy": 0.98},
        "health": {"min_accuracy": 0.9, "max_p95_ms": 50, "warmup_runs": 3, "timeout_s": 30},
    }
    base.update(overrides)
    return base


class Host:
    """A fleet key pair, a model and eval data, and bundles built and packed from them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.keys = init_keys(tmp / "keys")
        self.key = load_private_key(self.keys.private_path)
        self.model = tmp / "model.onnx"
        self.model.write_bytes(os.urandom(2048))
        self.eval = tmp / "eval.npz"
        np.savez(self.eval, x=np.zeros((4, 1, 8, 8), np.float32), y=np.arange(4))

    def tar(self, name: str = "b", key: Any = None, **overrides: Any) -> Path:
        folder = create_bundle(
            self.tmp / name,
            model_path=self.model,
            eval_npz_path=self.eval,
            manifest_fields=fields(**overrides),
            private_key=key or self.key,
        )
        return pack(folder, self.tmp / f"{name}.tar")


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path / "host")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    yield s
    s.close()


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    return tmp_path / "bundles"


@pytest.fixture
def client(store: Store, host: Host, bundle_dir: Path) -> Iterator[TestClient]:
    app = create_app(
        store, bundle_dir=bundle_dir, trusted_keys=[host.keys.public_path], max_upload_bytes=1 << 20
    )
    with TestClient(app) as c:
        yield c


def stored(bundle_dir: Path) -> list[str]:
    """What the bundle folder holds (no staging leftovers allowed)."""
    return sorted(p.name for p in bundle_dir.iterdir()) if bundle_dir.exists() else []


def test_upload_verifies_and_stores(client: TestClient, host: Host, store: Store, bundle_dir: Path) -> None:
    # act
    r = client.post("/api/bundles", content=host.tar().read_bytes(), headers=TAR)
    # assert
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["name"], body["version"], body["profile"], body["created"]) == ("digits", 7, "rpi4b", True)
    folder = Path(body["path"])
    assert folder.parent == bundle_dir
    assert (folder / "manifest.json").is_file()
    assert (folder / "model.onnx").read_bytes() == host.model.read_bytes()
    assert [b["id"] for b in store.bundles()] == [body["id"]]
    assert client.get(f"/api/bundles/{body['id']}").json()["manifest"]["health"]["min_accuracy"] == 0.9
    assert stored(bundle_dir) == [folder.name]


def test_same_bundle_again_is_200_not_a_duplicate(client: TestClient, host: Host, store: Store) -> None:
    data = host.tar().read_bytes()
    first = client.post("/api/bundles", content=data, headers=TAR).json()
    r = client.post("/api/bundles", content=data, headers=TAR)
    assert r.status_code == 200
    assert r.json()["id"] == first["id"]
    assert r.json()["created"] is False
    assert len(store.bundles()) == 1


def _tampered(tar_path: Path, member: str, change: Any) -> bytes:
    """Rewrite one member of a tar through `change(bytes) -> bytes`."""
    out = io.BytesIO()
    with tarfile.open(tar_path) as src, tarfile.open(fileobj=out, mode="w") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            if info.name.endswith(member):
                data = change(data)
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_tampered_model_is_422_and_nothing_stored(
    client: TestClient, host: Host, store: Store, bundle_dir: Path
) -> None:
    data = _tampered(host.tar(), "model.onnx", lambda b: bytes([b[0] ^ 1]) + b[1:])
    r = client.post("/api/bundles", content=data, headers=TAR)
    assert r.status_code == 422
    assert "does not verify" in r.json()["detail"]
    assert "Nothing was stored" in r.json()["detail"]
    assert store.bundles() == []
    assert stored(bundle_dir) == []


def test_bundle_signed_by_another_key_is_422(
    client: TestClient, host: Host, store: Store, tmp_path: Path
) -> None:
    other = load_private_key(init_keys(tmp_path / "other-keys").private_path)
    r = client.post("/api/bundles", content=host.tar("evil", key=other).read_bytes(), headers=TAR)
    assert r.status_code == 422
    assert "does not verify" in r.json()["detail"]
    assert store.bundles() == []


def test_failed_upload_keeps_what_is_stored(
    client: TestClient, host: Host, store: Store, bundle_dir: Path
) -> None:
    good = client.post("/api/bundles", content=host.tar().read_bytes(), headers=TAR).json()
    data = _tampered(
        host.tar("v8", version=8), "manifest.json", lambda b: b.replace(b'"version":8', b'"version":9')
    )
    r = client.post("/api/bundles", content=data, headers=TAR)
    assert r.status_code == 422
    assert [b["id"] for b in store.bundles()] == [good["id"]]
    assert stored(bundle_dir) == [Path(good["path"]).name]
    assert (Path(good["path"]) / "model.onnx").is_file()


def test_tar_with_parent_path_is_422(client: TestClient, store: Store) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    r = client.post("/api/bundles", content=out.getvalue(), headers=TAR)
    assert r.status_code == 422
    assert "tar-" in r.json()["detail"]
    assert store.bundles() == []


def test_not_a_tar_is_422(client: TestClient) -> None:
    r = client.post("/api/bundles", content=b"this is not a tar file at all", headers=TAR)
    assert r.status_code == 422
    assert "tar-invalid" in r.json()["detail"]


def test_tar_without_manifest_is_422(client: TestClient) -> None:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("model.onnx")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"abcd"))
    r = client.post("/api/bundles", content=out.getvalue(), headers=TAR)
    assert r.status_code == 422
    assert "not a bundle" in r.json()["detail"]


def test_empty_body_is_422(client: TestClient) -> None:
    r = client.post("/api/bundles", content=b"", headers=TAR)
    assert r.status_code == 422
    assert "--data-binary" in r.json()["detail"]


def test_upload_over_the_limit_is_413(client: TestClient, store: Store) -> None:
    r = client.post("/api/bundles", content=b"\0" * ((1 << 20) + 1), headers=TAR)
    assert r.status_code == 413
    assert "--max-upload-mb" in r.json()["detail"]
    assert store.bundles() == []


def test_upload_without_trusted_key_is_503(store: Store, host: Host, bundle_dir: Path) -> None:
    with TestClient(create_app(store, bundle_dir=bundle_dir)) as c:
        r = c.post("/api/bundles", content=host.tar().read_bytes(), headers=TAR)
    assert r.status_code == 503
    assert "--trusted-key" in r.json()["detail"]
    assert store.bundles() == []
