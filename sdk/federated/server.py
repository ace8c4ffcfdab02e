"""Round orchestration over MQTT: signed bounded plans, client selection, stragglers, validation, FedAvg.

Each round the host picks up to K devices that are online and serve the task's model, sends each one a
round plan signed with the fleet key (QoS 1, with an expiry), and waits for their updates until every
device answered or `round_timeout_s` passed; whoever has not answered by then is a dropout. Every update
is checked (shape, NaN/Inf, norm bound) and refused with a code when bad; with at least `min_clients`
good ones the head moves by their FedAvg (weighted by samples; unweighted under device-level DP). After
a broker restart the host asks unanswered devices again: a device never trains twice on one plan, it
resends the update it made.
"""

from __future__ import annotations

import logging
import queue
import random
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np

from edgefleet.agent.core.errors import ProtocolError
from edgefleet.agent.core.federated_msgs import (
    MAX_UPDATE_BYTES,
    FedAck,
    FedRoundCommand,
    FedStep,
    FedUpdate,
)
from edgefleet.agent.core.protocol import Topics, parse_device_message
from edgefleet.agent.federated.plan import RoundPlan
from edgefleet.sdk.federated.task import FederatedError, Task, features_of

log = logging.getLogger("edgefleet.federated")

# A plan stays valid this long past the round's timeout (clock skew between host and devices).
PLAN_GRACE_S = 300.0
# Rounds in a row that may fail (fewer than min_clients good updates) before the task stops.
MAX_FAILED_ROUNDS = 2


@dataclass
class FederateSettings:
    """How a federated task runs; the CLI flags and `Fleet.federate` arguments of the same names."""

    rounds: int = 10
    clients_per_round: int | None = None
    local_epochs: int = 1
    lr: float = 0.1
    batch: int = 32
    mu: float = 0.0
    min_clients: int = 2
    round_timeout_s: float = 60.0
    max_update_norm: float = 100.0
    dp_epsilon: float | None = None
    dp_delta: float = 1e-5
    dp_noise: float | None = None
    dp_clip: float = 1.0
    dp_level: str = "record"
    dp_min_samples: int = 50
    secure_agg: bool = False
    # Secure aggregation: per-coordinate bound of an update (larger values are clipped before masking).
    secagg_clip_range: float = 4.0
    seed: int | None = None

    def check(self) -> None:
        """Refuse settings that cannot work, naming the flag to change."""
        if self.rounds < 1:
            raise FederatedError("--rounds must be >= 1")
        if self.min_clients < 1:
            raise FederatedError("--min-clients must be >= 1")
        if self.clients_per_round is not None and self.clients_per_round < self.min_clients:
            raise FederatedError("--clients-per-round must be >= --min-clients")
        if self.round_timeout_s <= 0:
            raise FederatedError("--round-timeout must be > 0 seconds")
        if self.dp_epsilon is not None and self.dp_noise is not None:
            raise FederatedError(
                "give either --dp-epsilon (and --dp-delta) or --dp-noise (and --dp-clip), not both"
            )
        if self.dp_epsilon is not None and self.dp_epsilon <= 0:
            raise FederatedError("--dp-epsilon must be > 0")
        if self.dp_level not in ("record", "device"):
            raise FederatedError("--dp-level must be 'record' or 'device'")
        if not 0 < self.dp_delta < 1:
            raise FederatedError("--dp-delta must lie in (0, 1), e.g. 1e-5")

    @property
    def private(self) -> bool:
        """Whether differential privacy is on."""
        return self.dp_epsilon is not None or self.dp_noise is not None


@dataclass
class RoundReport:
    """What one round did: who trained, who dropped, who was refused and why, bytes, time and accuracy."""

    round: int
    selected: list[str]
    participants: list[str] = field(default_factory=list)
    dropouts: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    samples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    accuracy: float | None = None
    epsilon: float | None = None
    aggregated: bool = False

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    def line(self, total: int) -> str:
        """The progress line of the round."""
        acc = "-" if self.accuracy is None else f"{self.accuracy:.4f}"
        eps = "" if self.epsilon is None else f", ε {self.epsilon:.3g}"
        refused = "".join(f", {d} refused ({c})" for d, c in sorted(self.refused.items()))
        state = "" if self.aggregated else " (not aggregated: too few updates)"
        per_device = self.bytes_up // max(1, len(self.participants))
        return (
            f"round {self.round}/{total}: {len(self.participants)}/{len(self.selected)} participants, "
            f"{len(self.dropouts)} dropouts{refused}, {self.bytes_up} bytes up ({per_device} per device), "
            f"{self.bytes_down} down, accuracy {acc}{eps}, {self.seconds:.2f} s{state}"
        )


@dataclass
class FederateOutcome:
    """The trained head and the run's history."""

    task_id: str
    weight: np.ndarray
    bias: np.ndarray
    rounds: list[RoundReport]
    privacy: dict[str, Any] | None
    baseline_accuracy: float | None


def _decode(update: FedUpdate) -> np.ndarray | None:
    """The update's numbers, or None when its layout is not a flat float32 vector."""
    if update.dtype != "float32" or len(update.shape) != 1 or update.shape[0] * 4 != len(update.data):
        return None
    return np.frombuffer(update.data, dtype="<f4").astype(np.float64)


class RoundServer:
    """Runs a federated task on one fleet over MQTT (one broker connection for the whole task)."""

    def __init__(
        self,
        mqtt_options: Any,
        fleet: str,
        task: Task,
        private_key: Any,
        settings: FederateSettings,
        devices: Callable[[], list[dict[str, Any]]],
        *,
        task_id: str | None = None,
        on_round: Callable[[RoundReport], None] | None = None,
        on_sent: Callable[[int, list[str]], None] | None = None,
    ) -> None:
        settings.check()
        self.options = mqtt_options
        self.fleet = fleet
        self.task = task
        self.key = private_key
        self.settings = settings
        self.devices = devices
        self.task_id = task_id or f"fed-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.on_round = on_round
        self.on_sent = on_sent
        self._inbox: queue.Queue[tuple[Any, int]] = queue.Queue()
        self._reconnected = threading.Event()
        self._rng = random.Random(settings.seed)
        self._eval: tuple[np.ndarray, np.ndarray] | None = None
        self.noise = 0.0
        self._setup: Any = None

    # -- MQTT ---------------------------------------------------------------------------------------

    def _on_message(self, topic: str, payload: bytes, *rest: Any) -> None:
        try:
            message = parse_device_message(payload, max_bytes=2 * MAX_UPDATE_BYTES)
        except ProtocolError:
            return
        if isinstance(message, (FedUpdate, FedAck, FedStep)) and message.task == self.task_id:
            self._inbox.put((message, len(payload)))
        elif isinstance(message, FedAck) and message.status == "refused" and message.task == "":
            # A plan refused before it could be read (bad signature): it names the command only.
            self._inbox.put((message, len(payload)))

    def _connect(self) -> Any:
        from edgefleet.sdk.fleet.mqtt_url import connect

        first = threading.Event()

        def on_connect() -> None:
            if first.is_set():
                self._reconnected.set()
            first.set()

        conn = connect(
            self.options,
            on_message=self._on_message,
            client_id=f"edgefleet-fed-{uuid.uuid4().hex[:10]}",
            persistent=True,
            session_expiry_s=600,
            on_connect=on_connect,
        )
        conn.client.reconnect_delay_set(0.2, 2)
        conn.subscribe([(Topics.devices(self.fleet, "evt"), 1)])
        return conn

    # -- privacy --------------------------------------------------------------------------------------

    def _calibrate(self, fleet_size: int) -> None:
        from edgefleet.sdk.federated import accounting

        s = self.settings
        if s.dp_noise is not None:
            self.noise = float(s.dp_noise)
        elif s.dp_epsilon is not None:
            if s.dp_level == "device":
                k = min(s.clients_per_round or fleet_size, fleet_size)
                self.noise = accounting.device_level_noise_for(
                    s.dp_epsilon, s.dp_delta, k, fleet_size, s.rounds
                )
            else:
                # Not record_level_noise_for at min_samples alone: ε is not monotone in a device's
                # sample count (steps per epoch are ceil(N/batch)), so the worst N ≥ min is checked too.
                self.noise = accounting.record_level_noise_for_min(
                    s.dp_epsilon, s.dp_delta, s.dp_min_samples, s.batch, s.local_epochs, s.rounds
                )

    def _spent(
        self, samples: dict[str, int], rounds_of: dict[str, int], fleet_size: int
    ) -> dict[str, Any] | None:
        from edgefleet.sdk.federated import accounting

        s = self.settings
        if not s.private or not samples:
            return None
        if s.dp_level == "device":
            k = min(s.clients_per_round or fleet_size, fleet_size)
            rounds = max(rounds_of.values(), default=0)
            return accounting.device_level(self.noise, s.dp_delta, k, fleet_size, rounds).to_dict()
        return accounting.record_level(
            self.noise, s.dp_delta, samples, s.batch, s.local_epochs, rounds_of
        ).to_dict()

    # -- one round ------------------------------------------------------------------------------------

    def _plan(self, device: str, round_no: int, weight: np.ndarray, bias: np.ndarray) -> RoundPlan:
        s = self.settings
        record = s.private and s.dp_level == "record"
        device_level = s.private and s.dp_level == "device"
        return RoundPlan(
            task=self.task_id,
            round=round_no,
            device=device,
            expires=time.time() + s.round_timeout_s + PLAN_GRACE_S,
            model_name=self.task.name,
            model_version=self.task.version,
            input=self.task.input_name,
            feature="edgefleet_features",
            weight=weight.astype(np.float32),
            bias=bias.astype(np.float32),
            epochs=s.local_epochs,
            batch=s.batch,
            lr=s.lr,
            mu=s.mu,
            clip=s.dp_clip if record else None,
            # Device level: the noise goes on the sum (host), or in shares on the devices under SecAgg.
            noise=self.noise if record or (device_level and s.secure_agg) else 0.0,
            noise_share=s.min_clients if device_level and s.secure_agg else 0,
            update_clip=s.dp_clip if device_level else None,
            min_samples=s.dp_min_samples if record else 1,
            secagg=self._setup.to_dict() if self._setup is not None else None,
        )

    def _command(self, plan: RoundPlan) -> FedRoundCommand:
        from edgefleet.sdk.trust.keys import sign

        data = plan.to_bytes()
        return FedRoundCommand(
            id=f"{self.task_id}-r{plan.round}-{plan.device}"[:128],
            plan=data,
            signatures={"signatures": [sign(data, self.key)]},
        )

    def _eligible(self) -> list[str]:
        rows = self.devices()
        return sorted(
            d["device_id"]
            for d in rows
            if d.get("online")
            and d.get("active_model") == self.task.name
            and d.get("active_version") == self.task.version
        )

    def _run_round(
        self, conn: Any, round_no: int, selected: list[str], weight: np.ndarray, bias: np.ndarray
    ) -> tuple[RoundReport, dict[str, tuple[np.ndarray, int]]]:
        s = self.settings
        report = RoundReport(round=round_no, selected=list(selected))
        started = time.monotonic()
        commands = {d: self._command(self._plan(d, round_no, weight, bias)) for d in selected}
        payloads = {d: c.to_wire() for d, c in commands.items()}
        for device, payload in payloads.items():
            conn.publish(Topics(self.fleet, device).cmd, payload, qos=1)
            report.bytes_down += len(payload)
        if self.on_sent is not None:
            self.on_sent(round_no, list(selected))
        pending = set(selected)
        good: dict[str, tuple[np.ndarray, int]] = {}
        deadline = started + s.round_timeout_s
        while pending and time.monotonic() < deadline:
            if self._reconnected.is_set():
                # The broker restarted: ask whoever has not answered again (a device resends, never retrains).
                self._reconnected.clear()
                for device in sorted(pending):
                    conn.publish(Topics(self.fleet, device).cmd, payloads[device], qos=1)
            try:
                message, size = self._inbox.get(timeout=0.1)
            except queue.Empty:
                continue
            device = message.device
            if device not in pending:
                continue
            if isinstance(message, FedAck):
                if message.status == "refused" and message.ref == commands[device].id:
                    report.refused[device] = str(message.code)
                    pending.discard(device)
                continue
            if message.round != round_no or message.ref != commands[device].id:
                continue
            pending.discard(device)
            report.bytes_up += size
            code = self._check(message)
            if code is not None:
                report.refused[device] = code
                log.warning("round %d: update of %s refused: %s", round_no, device, code)
                continue
            vector = _decode(message)
            assert vector is not None
            good[device] = (vector, int(message.samples))
        report.dropouts = sorted(pending)
        report.participants = sorted(good)
        report.samples = sum(n for _, n in good.values())
        report.seconds = round(time.monotonic() - started, 3)
        return report, good

    def _check(self, update: FedUpdate) -> str | None:
        """The refusal code of a bad update (wrong shape, NaN/Inf, norm over the bound), None when good."""
        from edgefleet.agent.federated.aggregate import update_code

        vector = _decode(update)
        if vector is None:
            return "update-shape"
        bound = self.settings.max_update_norm
        if self.settings.private and self.settings.dp_level == "device":
            bound = min(bound, self.settings.dp_clip * 1.001)
        return update_code(
            vector, self.task.head.size, bound, max(1, int(update.samples)) if update.samples else 0
        )

    def _aggregate(self, good: dict[str, tuple[np.ndarray, int]]) -> np.ndarray:
        from edgefleet.agent.federated.aggregate import fedavg

        s = self.settings
        vectors = [v for v, _ in good.values()]
        if s.private and s.dp_level == "device":
            from edgefleet.agent.federated.dp import add_central_noise

            total = np.sum(vectors, axis=0)
            noisy = add_central_noise(total, self.noise, s.dp_clip, np.random.default_rng())
            return np.asarray(noisy) / len(vectors)
        return np.asarray(fedavg(vectors, [float(n) for _, n in good.values()]))

    def _accuracy(self, weight: np.ndarray, bias: np.ndarray) -> float | None:
        if self._eval is None:
            return None
        features, labels = self._eval
        return float(np.mean(np.argmax(features @ weight + bias, axis=1) == labels))

    def _load_eval(self) -> None:
        path = self.task.eval_path
        if path is None or not path.is_file():
            return
        with np.load(str(path), allow_pickle=False) as npz:
            if "y" not in npz.files:
                return
            x = npz["x"] if "x" in npz.files else npz[self.task.input_name]
            y = npz["y"].reshape(-1)
        self._eval = (features_of(self.task.model_path, self.task.input_name, x), y.astype(np.int64))

    # -- the task -------------------------------------------------------------------------------------

    def run(self) -> FederateOutcome:
        """Run every round; raises FederatedError when too few devices can take part."""
        s = self.settings
        self._load_eval()
        weight = self.task.head.weight.astype(np.float64)
        bias = self.task.head.bias.astype(np.float64)
        baseline = self._accuracy(weight, bias)
        eligible = self._eligible()
        if len(eligible) < s.min_clients:
            raise FederatedError(
                f"{len(eligible)} online devices serve {self.task.name} v{self.task.version}, fewer than "
                f"--min-clients {s.min_clients}: deploy that bundle first (`edgefleet deploy`)"
            )
        fleet_size = len(eligible)
        self._calibrate(fleet_size)
        samples: dict[str, int] = {}
        rounds_of: dict[str, int] = {}
        reports: list[RoundReport] = []
        failed = 0
        conn = self._connect()
        try:
            for round_no in range(1, s.rounds + 1):
                eligible = self._eligible() if round_no > 1 else eligible
                k = min(s.clients_per_round or len(eligible), len(eligible))
                selected = sorted(self._rng.sample(eligible, k)) if k else []
                if s.secure_agg:
                    from edgefleet.sdk.federated.secure_round import run_secure_round

                    report, delta, counts = run_secure_round(self, conn, round_no, selected, weight, bias)
                else:
                    report, good = self._run_round(conn, round_no, selected, weight, bias)
                    counts = {d: n for d, (_, n) in good.items()}
                    delta = self._aggregate(good) if len(good) >= s.min_clients else None
                if delta is not None:
                    weight = weight + delta[: weight.size].reshape(weight.shape)
                    bias = bias + delta[weight.size :]
                    report.aggregated = True
                    failed = 0
                    for device, n in counts.items():
                        samples[device] = max(samples.get(device, 0), n)
                        rounds_of[device] = rounds_of.get(device, 0) + 1
                else:
                    failed += 1
                report.accuracy = self._accuracy(weight, bias)
                spent = self._spent(samples, rounds_of, fleet_size)
                report.epsilon = None if spent is None else _finite(spent.get("epsilon"))
                reports.append(report)
                if self.on_round is not None:
                    self.on_round(report)
                if failed >= MAX_FAILED_ROUNDS:
                    raise FederatedError(
                        f"{failed} rounds in a row ended with fewer than --min-clients {s.min_clients} good "
                        f"updates (last: {len(report.participants)} of {len(report.selected)}, dropouts "
                        f"{report.dropouts}, refused {report.refused}); raise --round-timeout or check the devices"
                    )
        finally:
            conn.close()
        return FederateOutcome(
            self.task_id, weight, bias, reports, self._spent(samples, rounds_of, fleet_size), baseline
        )


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


__all__ = ["FederateOutcome", "FederateSettings", "RoundReport", "RoundServer"]
