"""The device's side of a federated round: verify the signed plan, check it, train the head, send the change.

A `fed-round` command arrives on the worker thread; the checks that need no data run there and the
training runs on a thread of its own, so commands, chunks and telemetry keep flowing. Features come
from the installed model through its runtime (the plan names the output that holds them); the head is
trained with numpy only (agent/federated/dp.py). What leaves the device is an ack and the head's change
(weight and bias deltas, optionally clipped) with the number of examples — never an input or a label.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Dict, Optional, Tuple

import numpy as np

from edgefleet.agent.core.errors import AgentError
from edgefleet.agent.core.federated_msgs import (
    FedAck,
    FedCode,
    FedRoundCommand,
    FedStep,
    FedStepCommand,
    FedUpdate,
)
from edgefleet.agent.federated.data import FeedbackBuffer, load_train_data
from edgefleet.agent.federated.plan import PlanError, RoundPlan, parse_plan

log = logging.getLogger("edgefleet.agent.federated")

# Rows per feature batch through the runtime.
FEATURE_BATCH = 256


class FederatedClient:
    """Runs the rounds the host asks this device to take part in (one at a time)."""

    def __init__(self, agent: Any) -> None:
        self.agent = agent
        config = agent.config
        capacity = int(getattr(config, "keep_feedback", 0) or 0)
        self.buffer: Optional[FeedbackBuffer] = (
            FeedbackBuffer(agent.state_dir, capacity) if capacity > 0 else None
        )
        self.train_data: Optional[str] = getattr(config, "train_data", None) or None
        self._lock = threading.Lock()
        self._running: Optional[Tuple[str, int]] = None
        # Outcome of recent rounds: the update's fields when one was sent (resent when the host asks again).
        self._done: Dict[Tuple[str, int], Optional[Dict[str, Any]]] = {}
        self._thread: Optional[threading.Thread] = None
        # Secure aggregation in progress: (task, round) → (SecAgg client, update, weight, command id).
        self._secagg: Dict[Tuple[str, int], Tuple[Any, np.ndarray, float, str]] = {}
        # Answers already sent per (task, round, stage), sent again when the host asks again.
        self._answers: Dict[Tuple[str, int, str], Tuple[str, bytes]] = {}

    # -- messages ---------------------------------------------------------------------------------

    def _ack(
        self, cmd_id: str, task: str, round_no: int, status: str, code: Optional[str] = None, reason: str = ""
    ) -> None:
        self.agent._send(
            FedAck, task=task, round=round_no, ref=cmd_id, status=status, code=code, reason=reason
        )

    def on_round(self, cmd: FedRoundCommand) -> None:
        """Handle one round command (worker thread): verify, check, then train on a thread of its own."""
        try:
            plan = self._verify(cmd)
        except AgentError as exc:
            log.warning("round plan %s refused: %s", cmd.id, exc)
            self._ack(cmd.id, "", 0, "refused", exc.code, exc.reason)
            return
        key = (plan.task, plan.round)
        with self._lock:
            if key in self._done or self._running == key:
                # A QoS 1 redelivery, or the host asking again after it lost the answer (a broker
                # restart): never train twice on one plan, send the same update again.
                sent = self._done.get(key)
                log.info("round %s/%d already handled", plan.task, plan.round)
                if sent is not None:
                    self.agent._send(FedUpdate, **sent)
                return
            if self._running is not None:
                self._ack(
                    cmd.id, plan.task, plan.round, "refused", FedCode.BUSY, "another round is still training"
                )
                return
            self._running = key
        self._thread = threading.Thread(
            target=self._run, args=(cmd.id, plan), name="edgefleet-federated", daemon=True
        )
        self._thread.start()

    def _verify(self, cmd: FedRoundCommand) -> RoundPlan:
        """Signature over the exact plan bytes first (the fleet key, like bundles), then the plan's values."""
        trust = self.agent.trust
        if trust is None:
            raise PlanError(FedCode.PLAN_UNSIGNED, "this agent has no trusted keys yet")
        trust.verify_signatures(cmd.plan, cmd.signatures)
        plan = parse_plan(cmd.plan, device_id=self.agent.config.device_id)
        active = self.agent.server.active if self.agent.server is not None else None
        if active is None or active.name != plan.model_name or int(active.version) != plan.model_version:
            have = "no model" if active is None else f"{active.name} v{active.version}"
            raise PlanError(
                FedCode.PLAN_WRONG_MODEL,
                f"the plan trains {plan.model_name} v{plan.model_version}, this device serves {have}",
            )
        return plan

    # -- the round ---------------------------------------------------------------------------------

    def _run(self, cmd_id: str, plan: RoundPlan) -> None:
        key = (plan.task, plan.round)
        outcome: Optional[Dict[str, Any]] = None
        try:
            x, y = load_train_data(self.train_data, plan.input, self.buffer, plan.max_samples)
            if len(y) < plan.min_samples:
                raise AgentError(
                    FedCode.NO_TRAIN_DATA,
                    f"{len(y)} local examples, fewer than the {plan.min_samples} the privacy budget assumed",
                )
            features = self._features(plan, x)
            self._ack(cmd_id, plan.task, plan.round, "accepted")
            update, detail = self._train(plan, features, y)
            if plan.secagg is not None:
                # Device-level DP averages clipped updates unweighted: a sample count would change the sensitivity.
                weight = 1.0 if plan.update_clip is not None else float(len(y))
                self._advertise(cmd_id, plan, update, weight)
                return
            fields: Dict[str, Any] = dict(
                task=plan.task,
                round=plan.round,
                ref=cmd_id,
                samples=len(y),
                dtype="float32",
                shape=(int(update.size),),
                data=update.astype("<f4").tobytes(),
                detail=detail,
            )
            self.agent._send(FedUpdate, **fields)
            outcome = fields
            log.info(
                "round %s/%d: update of %d numbers from %d examples sent",
                plan.task,
                plan.round,
                update.size,
                len(y),
            )
        except AgentError as exc:
            log.warning("round %s/%d failed: %s", plan.task, plan.round, exc)
            self._ack(cmd_id, plan.task, plan.round, "refused", exc.code, exc.reason)
        except Exception as exc:  # a training bug must not kill the agent
            log.exception("round %s/%d failed", plan.task, plan.round)
            self._ack(
                cmd_id, plan.task, plan.round, "refused", FedCode.TRAIN_FAILED, f"{type(exc).__name__}: {exc}"
            )
        finally:
            with self._lock:
                self._running = None
                self._done[key] = outcome
                while len(self._done) > 64:
                    self._done.pop(next(iter(self._done)))

    def _features(self, plan: RoundPlan, x: np.ndarray) -> np.ndarray:
        """The backbone's output `plan.feature` for every local row, through the installed model's runtime."""
        server = self.agent.server
        out = []
        with server.hold() as model:
            names = [t.name for t in model.info.outputs]
            if plan.feature not in names:
                raise AgentError(
                    FedCode.NO_FEATURES,
                    f"the installed model has no output {plan.feature!r} (outputs: {names}); deploy the bundle "
                    "`edgefleet federate BUNDLE --prepare` made",
                )
            for start in range(0, len(x), FEATURE_BATCH):
                values = server.run_on(model, {plan.input: x[start : start + FEATURE_BATCH]})
                out.append(
                    np.asarray(values[plan.feature], dtype=np.float64).reshape(
                        min(FEATURE_BATCH, len(x) - start), -1
                    )
                )
        features = np.concatenate(out)
        if features.shape[1] != plan.weight.shape[0]:
            raise AgentError(
                FedCode.NO_FEATURES,
                f"output {plan.feature!r} has {features.shape[1]} features, the head takes {plan.weight.shape[0]}",
            )
        return features

    def _train(
        self, plan: RoundPlan, features: np.ndarray, y: np.ndarray
    ) -> Tuple[np.ndarray, Dict[str, Any]]:
        """Local epochs on the head; returns the flat change [weight, bias] and numbers about the run."""
        from edgefleet.agent.federated.aggregate import flatten
        from edgefleet.agent.federated.dp import clip_update, train_softmax_head

        if y.size and int(y.max()) >= plan.weight.shape[1]:
            raise AgentError(
                FedCode.NO_TRAIN_DATA,
                f"local labels reach {int(y.max())} but the head has {plan.weight.shape[1]} classes",
            )
        # DP noise must be unpredictable: fresh OS randomness, never a seed from the wire.
        rng = np.random.default_rng(secrets.randbits(128))
        started = time.monotonic()
        result = train_softmax_head(
            plan.weight.astype(np.float64),
            plan.bias.astype(np.float64),
            features,
            y,
            epochs=plan.epochs,
            batch_size=plan.batch,
            lr=plan.lr,
            rng=rng,
            mu=plan.mu,
            clip=plan.clip,
            noise_multiplier=plan.noise if plan.clip is not None else 0.0,
        )
        update = flatten([result.weight - plan.weight, result.bias - plan.bias])
        if plan.update_clip is not None:
            update = clip_update(update, plan.update_clip)
            if plan.noise_share > 0 and plan.noise > 0:
                from edgefleet.agent.federated.dp import add_noise_share

                # Device-level DP under secure aggregation: the host never sees the sum without noise.
                update = add_noise_share(update, plan.noise, plan.update_clip, plan.noise_share, rng)
        detail = {"steps": int(result.steps), "seconds": round(time.monotonic() - started, 3)}
        if plan.clip is None and not plan.noise:
            # The training loss is a function of every local example: with DP on it is not covered by the
            # guarantee, so only a non-private round reports it.
            detail["loss"] = round(float(result.loss), 6)
        return np.asarray(update, dtype=np.float32), detail

    # -- secure aggregation (SecAgg+): the update leaves the device only masked ---------------------------

    def _advertise(self, cmd_id: str, plan: RoundPlan, update: np.ndarray, samples: float) -> None:
        """Stage 1: keep the update and send this round's public keys."""
        from edgefleet.agent.federated.secagg import SecAggClient, SecAggSetup

        try:
            setup = SecAggSetup.from_dict(plan.secagg or {})
            client = SecAggClient(setup, self.agent.config.device_id)
        except (ValueError, KeyError, TypeError) as exc:
            raise AgentError(
                FedCode.PLAN_INVALID, f"the plan's secure-aggregation setup is unusable: {exc}"
            ) from None
        weight = min(samples, float(setup.max_weight))
        key = (plan.task, plan.round)
        with self._lock:
            self._secagg[key] = (client, update, weight, cmd_id)
            while len(self._secagg) > 4:
                self._secagg.pop(next(iter(self._secagg)))
        self.agent._send(
            FedStep, task=plan.task, round=plan.round, stage="advertise", payload=client.advertise()
        )

    def on_step(self, cmd: FedStepCommand) -> None:
        """A secure-aggregation stage from the host (worker thread): answer it, or refuse with a code.

        A stage the host sends again (a QoS 1 redelivery, or a resend after a broker restart) gets the
        same answer again: each SecAgg stage runs once (a second unmask answer could reveal both shares).
        """
        key = (cmd.task, cmd.round)
        with self._lock:
            state = self._secagg.get(key)
            answered = self._answers.get((cmd.task, cmd.round, cmd.stage))
        if answered is not None:
            self.agent._send(FedStep, task=cmd.task, round=cmd.round, stage=answered[0], payload=answered[1])
            return
        if state is None:
            reason = "no secure round in progress here"
            self._ack(cmd.id, cmd.task, cmd.round, "refused", FedCode.SECAGG_FAILED, reason)
            return
        client, update, weight, cmd_id = state
        try:
            if cmd.stage == "keys":
                stage, payload = "shares", client.share_keys(cmd.payload)
            elif cmd.stage == "shares":
                stage, payload = "masked", client.masked_input(cmd.payload, update, weight)
            elif cmd.stage == "unmask":
                stage, payload = "unmasked", client.unmask(cmd.payload)
            else:
                raise AgentError(FedCode.SECAGG_FAILED, f"unknown secure-aggregation stage {cmd.stage!r}")
        except AgentError as exc:
            with self._lock:
                self._secagg.pop(key, None)
            self._ack(cmd_id, cmd.task, cmd.round, "refused", exc.code, exc.reason)
            return
        with self._lock:
            self._answers[(cmd.task, cmd.round, cmd.stage)] = (stage, payload)
            while len(self._answers) > 16:
                self._answers.pop(next(iter(self._answers)))
        self.agent._send(FedStep, task=cmd.task, round=cmd.round, stage=stage, payload=payload)

    def join(self, timeout: Optional[float] = None) -> None:
        """Wait for a running round to end (tests, shutdown)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


__all__ = ["FederatedClient"]
