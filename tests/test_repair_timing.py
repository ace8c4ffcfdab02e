"""The agent's repair timer follows the link: no request for chunks still in flight behind a slow link."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from edgefleet.agent.core.protocol import Missing
from edgefleet.agent.deployment import REPAIR_GAP_FACTOR, Send
from tests.test_agent_machine import REPAIR_S, Clock, Device, _blocks, _command, _verifier

STEP_S = 0.25


@pytest.fixture(scope="module")
def signed(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A signed bundle of a 10-chunk model, the fleet's public key and the files' bytes."""
    from edgefleet.sdk.trust.keys import init_keys
    from tests.agent_net_support import make_bundle

    root = tmp_path_factory.mktemp("repair-bundle")
    keys = init_keys(root / "keys")
    (root / "model.onnx").write_bytes(bytes(range(256)) * 9 + b"tail")
    (root / "eval.npz").write_bytes(b"eval" * 100)
    bundle = make_bundle(root / "bundle", root / "keys", root / "model.onnx", root / "eval.npz", version=3)
    manifest = (bundle / "manifest.json").read_bytes()
    files = {name: (bundle / name).read_bytes() for name in json.loads(manifest)["files"]}
    signatures = json.loads((bundle / "signature.json").read_bytes())
    return SimpleNamespace(manifest=manifest, signatures=signatures, files=files, pub=str(keys.public_path))


@pytest.fixture
def device(tmp_path: Path, signed: SimpleNamespace) -> Device:
    return Device(tmp_path / "state", _verifier(signed, tmp_path / "state"), Clock())


def _run(dev: Device, seconds: float) -> list[float]:
    """Tick every STEP_S for `seconds`; the clock times at which missing chunks were asked for."""
    asked: list[float] = []
    end = dev.clock.now + seconds
    while dev.clock.now < end - 1e-9:
        dev.clock.advance(STEP_S)
        if any(isinstance(a, Send) and a.cls is Missing for a in dev.tick()):
            asked.append(dev.clock.now)
    return asked


def _model(dev: Device, signed: SimpleNamespace) -> tuple[str, list[bytes]]:
    cmd = _command(signed)
    dev.deploy(cmd)
    spec = next(f for f in cmd.files if f.file == "model.onnx")
    return spec.sha256, _blocks(signed.files["model.onnx"])


def test_chunks_slower_than_the_repair_delay_are_not_asked_for_while_they_keep_coming(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: the first chunks come every 1.5 s (the link's pace: 4 × 1.5 s = 6 s of patience)
    sha, blocks = _model(device, signed)
    asked: list[float] = []
    for i in range(4):
        device.chunk(sha, i, blocks[i])
        asked += _run(device, 1.5)
    # act: a busy broker stretches the gaps to 3 s, over the 2 s repair delay
    for i in range(4, 8):
        device.chunk(sha, i, blocks[i])
        asked += _run(device, 3.0)
    # assert: no request while the chunks keep coming (the old fixed 2 s delay asked after every chunk)
    assert asked == []
    assert device.machine.pending is not None
    assert device.machine.pending.chunk_gap > REPAIR_S / REPAIR_GAP_FACTOR


def test_once_chunks_stop_the_request_waits_the_links_pace_then_backs_off(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: chunks every 1.0 s, then none (two of the model's chunks never come)
    sha, blocks = _model(device, signed)
    for i in range(len(blocks) - 2):
        device.chunk(sha, i, blocks[i])
        assert _run(device, 1.0) == []
    last = device.clock.now - 1.0
    gap = device.machine.pending.chunk_gap if device.machine.pending else 0.0
    # act
    asked = _run(device, 30.0)
    # assert: the first request after ~4 gaps (not after 2 s), then each one twice as late as the last
    assert abs(gap - 1.0) < 1e-6
    assert asked, "missing chunks were never asked for"
    assert REPAIR_GAP_FACTOR * gap - STEP_S <= asked[0] - last <= REPAIR_GAP_FACTOR * gap + STEP_S
    waits = [b - a for a, b in zip(asked, asked[1:])]
    assert len(waits) >= 2
    assert all(later > 1.5 * earlier for earlier, later in zip(waits, waits[1:])), waits


def test_a_reconnect_asks_quickly_and_a_wait_across_a_request_does_not_slow_the_pace(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: a slow stream (3 s gaps, learned as the pace), then a stop long enough to ask once
    sha, blocks = _model(device, signed)
    device.chunk(sha, 0, blocks[0])
    for i in range(1, 4):
        device.clock.advance(3.0)
        device.chunk(sha, i, blocks[i])
    stopped = device.clock.now
    paced = _run(device, 14.0)
    # act: the broker connection drops and comes back
    device.tick(connected=False)
    back = device.clock.now
    device.machine.reconnected(back)
    quick = _run(device, 1.0)
    # the repairs then come quickly: their pace, not the silence before them, is what counts
    for i in range(4, 7):
        device.chunk(sha, i, blocks[i], repair=True)
        device.clock.advance(0.1)
    # assert: the first request waited 4 gaps of 3 s, the one after the reconnect went at once
    assert len(paced) == 1 and paced[0] - stopped >= REPAIR_GAP_FACTOR * 3.0 - STEP_S
    assert len(quick) == 1 and quick[0] - back <= STEP_S + 1e-6
    pending = device.machine.pending
    assert pending is not None and pending.chunk_gap < 3.0


def test_copies_still_arriving_defer_the_request_but_not_forever(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: chunks 0-5 arrive at 1 s gaps (a pace of 1 s: 4 s of patience), 6-9 never come
    sha, blocks = _model(device, signed)
    for i in range(6):
        device.chunk(sha, i, blocks[i])
        device.clock.advance(1.0)
    # act: copies of chunks already here keep coming every 1 s (a repair that crossed the broadcast)
    asked: list[float] = []
    for n in range(40):
        device.chunk(sha, n % 6, blocks[n % 6])
        asked += _run(device, 1.0)
    # assert: no request while copies flowed in the first 30 s after the last fresh chunk, then one
    last_fresh = device.clock.now - 40.0 - 1.0
    assert asked, "the request never went"
    assert 30.0 - STEP_S <= asked[0] - last_fresh <= 30.0 + REPAIR_GAP_FACTOR * 1.0 + STEP_S, asked


def test_a_link_slower_than_the_repair_delay_from_the_start_is_asked_once_then_learned(
    device: Device, signed: SimpleNamespace
) -> None:
    # prepare: every chunk takes 2.5 s, over the 2 s repair delay, from the first one on
    sha, blocks = _model(device, signed)
    asked: list[float] = []
    # act
    for i in range(len(blocks) - 1):
        device.chunk(sha, i, blocks[i])
        asked += _run(device, 2.5)
    # assert: one request before the pace was known (the fixed delay asked after every chunk)
    assert len(asked) == 1, asked


def test_a_slow_first_chunk_sets_the_wait_for_the_second(device: Device, signed: SimpleNamespace) -> None:
    # prepare: the first chunk comes 3 s after the deploy (1 Mbit/s: a 256 KiB chunk takes ~2 s)
    sha, blocks = _model(device, signed)
    asked = _run(device, 3.0)
    # act: then one chunk every 2.5 s
    for i in range(len(blocks) - 1):
        device.chunk(sha, i, blocks[i])
        asked += _run(device, 2.5)
    # assert: only the request before any chunk came (the fixed delay asked again after the first chunk)
    assert len(asked) == 1 and asked[0] <= device.clock.now - 2.5 * (len(blocks) - 1) - 0.5, asked


def test_a_reconnect_to_a_kept_session_waits_the_links_pace(device: Device, signed: SimpleNamespace) -> None:
    # prepare: chunks every 2 s (8 s of patience), then the connection drops and comes back
    sha, blocks = _model(device, signed)
    for i in range(4):
        device.chunk(sha, i, blocks[i])
        device.clock.advance(2.0)
    device.tick(connected=False)
    back = device.clock.now
    # act: the broker kept the session (it delivers what it queued), and nothing comes
    device.machine.reconnected(back, session_present=True)
    asked = _run(device, 12.0)
    # assert: no quick ask; the request comes after the paced wait
    assert asked and asked[0] - back >= REPAIR_GAP_FACTOR * 2.0 - STEP_S, asked
