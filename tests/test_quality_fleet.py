"""Quality from device to store: real agent processes, Mosquitto, the fleet's sender and ingest.

A labelled bundle fills the store's `accuracy` column, a reference bundle its `agreement` and `fidelity`
columns (docs/quality.md), read from the eval the device reports after its install's health check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgefleet.sdk.fleet.ingest import Ingest
from edgefleet.sdk.fleet.mqtt_url import MqttOptions
from edgefleet.sdk.store import Store
from tests.agent_net_support import CLASSES, IN_FEATURES, PROFILE, eval_set, export_tiny_onnx, make_bundle
from tests.fleet_support import Host, agents, wait_for

pytestmark = pytest.mark.broker


def _reference_bundle(out: Path, keys: Path, model: Path, work: Path) -> Path:
    """A bundle whose eval set holds the model's own outputs (`reference`), gated on agreement."""
    import onnxruntime as ort

    from edgefleet.sdk.trust.bundle import create_bundle
    from edgefleet.sdk.trust.keys import load_private_key

    x = np.random.default_rng(3).standard_normal((32, IN_FEATURES)).astype(np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    np.savez(work / "ref.npz", x=x, reference=session.run(None, {"x": x})[0])
    fields = {
        "name": "embed",
        "version": 1,
        "target": {"profile": PROFILE, "device_ids": []},
        "model": {"format": "onnx", "runtime": "onnxruntime"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": [None, IN_FEATURES]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [None, CLASSES]}],
        "eval": {"kind": "reference", "metric": "fidelity"},
        "health": {"metric": "agreement", "min_quality": 0.99, "warmup_runs": 1, "timeout_s": 60},
    }
    return create_bundle(
        out,
        model_path=model,
        eval_npz_path=work / "ref.npz",
        manifest_fields=fields,
        private_key=load_private_key(keys / "fleet.key"),
    )


def _quality_row(store: Store, fleet: str, device: str, column: str) -> dict[str, Any] | None:
    for row in store.latest_telemetry(fleet, device, limit=20):
        if row[column] is not None:
            return row
    return None


def test_store_quality_columns_fill_for_labelled_and_reference_bundles(
    tmp_path: Path, mosquitto: Any, fleet_name: str
) -> None:
    # prepare: one model, a labelled bundle (labels = its own top-1) and a reference bundle
    from edgefleet.sdk.trust.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    model = export_tiny_onnx(tmp_path / "m.onnx", seed=0)
    labelled = make_bundle(
        tmp_path / "labelled", tmp_path / "keys", model, eval_set(model, tmp_path / "e.npz"), version=1
    )
    reference = _reference_bundle(tmp_path / "reference", tmp_path / "keys", model, tmp_path)
    store = Store(f"sqlite:///{tmp_path / 'fleet.db'}")
    ingest = Ingest(store, MqttOptions(mosquitto.url), fleet_name, max_delay_s=0.05)
    ingest.start()
    host = Host(mosquitto.url, fleet_name, tmp_path / "host", keys.public_path)
    try:
        with agents(tmp_path / "agents", mosquitto.url, fleet_name, keys.public_path, ["lab-1", "ref-1"]):
            wait_for(
                lambda: all((store.device(fleet_name, d) or {}).get("online") for d in ("lab-1", "ref-1")),
                30,
                "both agents online",
            )
            # act
            outcomes = [host.deploy(labelled, "lab-1"), host.deploy(reference, "ref-1")]
            assert [o.status for o in outcomes] == ["deployed", "deployed"], outcomes
            lab = wait_for(
                lambda: _quality_row(store, fleet_name, "lab-1", "accuracy"), 30, "accuracy stored"
            )
            ref = wait_for(
                lambda: _quality_row(store, fleet_name, "ref-1", "fidelity"), 30, "fidelity stored"
            )
        # assert: each bundle fills the columns of its eval kind, in the vocabulary's names
        assert (lab["model_name"], lab["accuracy"], lab["agreement"], lab["fidelity"]) == (
            "tiny",
            1.0,
            None,
            None,
        )
        assert ref["model_name"] == "embed"
        assert ref["accuracy"] is None and ref["agreement"] == 1.0
        assert ref["fidelity"] == pytest.approx(1.0, abs=1e-5)
        [reading] = [q for q in ref["payload"]["quality"] if q["source"] == "eval"]
        assert reading["metric"] == "agreement" and reading["samples"] == 32
        series = store.series(fleet_name, device_id="ref-1", model_name="embed", bucket_s=3600)
        assert any(p.agreement == 1.0 for p in series)
    finally:
        host.close()
        ingest.close()
        store.close()
