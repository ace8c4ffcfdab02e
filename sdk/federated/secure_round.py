"""One round with secure aggregation (SecAgg+, Bonawitz et al. 2017) over MQTT: the host sees only the sum.

The signed plan carries the round's SecAggSetup (nodes, threshold, clip range). Devices train, then the
four stages run through the host, which only relays: (1) each device advertises two public keys, (2) gets
its neighbours' keys and answers with Shamir shares of its secrets encrypted to each neighbour, (3) gets
the shares meant for it and answers with its masked input (weighted update + self mask + pairwise masks,
fixed point mod 2^32), (4) answers the unmask request with the shares that let the host remove the masks
of survivors and of devices that dropped after stage 2. The first stage gets half of the round's timeout
(it includes training), the other three share the rest; whoever misses a stage is a dropout, and the round
counts when at least max(threshold, min_clients) devices are in the sum.
"""

from __future__ import annotations

import queue
import time
from typing import Any, Callable

import numpy as np

from edgefleet.agent.core.federated_msgs import FedAck, FedStep, FedStepCommand
from edgefleet.agent.core.protocol import Topics
from edgefleet.sdk.federated.server import RoundReport

# Weights (sample counts) are capped at this in the masked sum (SecAggSetup.max_weight).
MAX_WEIGHT = 10_000.0


def _clip_range(server: Any) -> float:
    """Per-coordinate range of the masked values: the setting, widened to hold device-level noise shares."""
    s = server.settings
    if s.private and s.dp_level == "device":
        share = server.noise * s.dp_clip / max(1, s.min_clients) ** 0.5
        return float(max(s.secagg_clip_range, s.dp_clip + 8 * share))
    return float(s.secagg_clip_range)


def _collect(
    server: Any,
    conn: Any,
    round_no: int,
    stage: str,
    expected: set[str],
    commands: dict[str, Any],
    report: RoundReport,
    deadline: float,
    receive: Callable[[str, bytes], None],
    resend: dict[str, bytes] | None = None,
) -> set[str]:
    """Wait for `stage` answers from `expected` until `deadline`; returns who answered well."""
    from edgefleet.agent.federated.secagg import SecAggError

    pending, done = set(expected), set()
    while pending and time.monotonic() < deadline:
        if resend is not None and server._reconnected.is_set():
            server._reconnected.clear()
            for device in sorted(pending):
                conn.publish(Topics(server.fleet, device).cmd, resend[device], qos=1)
        try:
            message, size = server._inbox.get(timeout=0.1)
        except queue.Empty:
            continue
        device = message.device
        if device not in pending or message.round not in (round_no, 0):
            continue
        if isinstance(message, FedAck):
            if message.status == "refused" and message.ref == commands[device].id:
                report.refused[device] = str(message.code)
                pending.discard(device)
            continue
        if not isinstance(message, FedStep) or message.stage != stage or message.round != round_no:
            continue
        pending.discard(device)
        report.bytes_up += size
        try:
            receive(device, message.payload)
        except SecAggError as exc:
            report.refused[device] = exc.code
            continue
        done.add(device)
    return done


def _send(
    server: Any, conn: Any, round_no: int, stage: str, payloads: dict[str, bytes], report: RoundReport
) -> dict[str, bytes]:
    """Send one stage's messages; returns each device's wire bytes (sent again after a broker restart)."""
    sent: dict[str, bytes] = {}
    for device, payload in payloads.items():
        cmd = FedStepCommand(
            id=f"{server.task_id}-r{round_no}-{stage}-{device}"[:128],
            task=server.task_id,
            round=round_no,
            stage=stage,
            payload=payload,
        )
        wire = cmd.to_wire()
        conn.publish(Topics(server.fleet, device).cmd, wire, qos=1)
        report.bytes_down += len(wire)
        sent[device] = wire
    return sent


def run_secure_round(
    server: Any, conn: Any, round_no: int, selected: list[str], weight: np.ndarray, bias: np.ndarray
) -> tuple[RoundReport, np.ndarray | None, dict[str, int]]:
    """Run one secure round; (report, the survivors' weighted mean update or None, samples assumed per device)."""
    from edgefleet.agent.federated.secagg import SecAggError, SecAggServer, SecAggSetup

    s = server.settings
    report = RoundReport(round=round_no, selected=list(selected))
    started = time.monotonic()
    if len(selected) < 2:
        report.dropouts = list(selected)
        return report, None, {}
    threshold = max(2, (len(selected) - 1) // 2 + 1)
    server._setup = SecAggSetup(
        round_id=f"{server.task_id}-r{round_no}",
        nodes=tuple(selected),
        threshold=threshold,
        clip_range=_clip_range(server),
        vector_size=server.task.head.size,
        max_weight=MAX_WEIGHT,
    )
    agg = SecAggServer(server._setup)
    try:
        commands = {d: server._command(server._plan(d, round_no, weight, bias)) for d in selected}
    finally:
        server._setup = None
    payloads = {d: c.to_wire() for d, c in commands.items()}
    for device, payload in payloads.items():
        conn.publish(Topics(server.fleet, device).cmd, payload, qos=1)
        report.bytes_down += len(payload)
    if server.on_sent is not None:
        server.on_sent(round_no, list(selected))
    need = max(threshold, s.min_clients)
    timeout = s.round_timeout_s
    alive = _collect(
        server,
        conn,
        round_no,
        "advertise",
        set(selected),
        commands,
        report,
        started + timeout / 2,
        agg.receive_advertise,
        payloads,
    )
    mean = None
    if len(alive) >= need:
        sent = _send(server, conn, round_no, "keys", {d: agg.keys_for(d) for d in alive}, report)
        alive = _collect(
            server,
            conn,
            round_no,
            "shares",
            alive,
            commands,
            report,
            started + timeout * 2 / 3,
            agg.receive_shares,
            sent,
        )
    if len(alive) >= need:
        sent = _send(server, conn, round_no, "shares", {d: agg.shares_for(d) for d in alive}, report)
        alive = _collect(
            server,
            conn,
            round_no,
            "masked",
            alive,
            commands,
            report,
            started + timeout * 5 / 6,
            agg.receive_masked,
            sent,
        )
    if len(alive) >= need:
        request = agg.unmask_request()
        sent = _send(server, conn, round_no, "unmask", {d: request for d in alive}, report)
        _collect(
            server,
            conn,
            round_no,
            "unmasked",
            alive,
            commands,
            report,
            started + timeout,
            agg.receive_unmask,
            sent,
        )
        try:
            mean, _total = agg.result()
        except SecAggError as exc:
            report.refused["(aggregate)"] = exc.code
            mean = None
    survivors = list(agg.survivors) if mean is not None else []
    report.participants = sorted(survivors)
    report.dropouts = sorted(set(selected) - set(survivors) - set(report.refused))
    report.seconds = round(time.monotonic() - started, 3)
    if mean is not None and len(survivors) < s.min_clients:
        mean = None
    # Sample counts stay inside the masked sum; record-level accounting assumes the least a device may hold.
    counts = {d: int(s.dp_min_samples) for d in survivors}
    return report, None if mean is None else np.asarray(mean, dtype=np.float64), counts


__all__ = ["MAX_WEIGHT", "run_secure_round"]
