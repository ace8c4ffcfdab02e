"""`Fleet`: the public API of the control plane (devices, deploy, rollouts, abort, telemetry, ingest)."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefleet.agent.core.codes import ENDED_ROLLOUT, RolloutStatus
from edgefleet.agent.core.events import Telemetry
from edgefleet.agent.core.paths import edgefleet_home
from edgefleet.sdk.fleet import registry
from edgefleet.sdk.fleet.bundles import ResolvedBundle, load_bundles
from edgefleet.sdk.fleet.errors import BundleRefused, FleetError, RolloutConflict, RolloutNotFound
from edgefleet.sdk.fleet.ingest import Ingest
from edgefleet.sdk.fleet.mqtt_url import MqttOptions, default_broker_url
from edgefleet.sdk.fleet.progress import EngineView, engine_alive
from edgefleet.sdk.fleet.rollout import DEFAULT_LEASE_S, RolloutEngine
from edgefleet.sdk.fleet.selectors import parse_selector, resolve
from edgefleet.sdk.fleet.strategy import AbortRules, parse_strategy, rules_with
from edgefleet.sdk.store import Store
from edgefleet.sdk.trust.command_signing import use_command_keys


@dataclass
class RolloutHandle:
    """A rollout started or resumed by this process; `wait()` blocks until it ends."""

    id: str
    engine: RolloutEngine
    thread: threading.Thread | None = None
    error: BaseException | None = None

    def wait(self, timeout: float | None = None) -> RolloutStatus:
        """Block until the rollout ends (or `timeout`); returns its status."""
        if self.thread is not None:
            self.thread.join(timeout)
        if self.error is not None:
            raise self.error
        return self.engine.status

    @property
    def status(self) -> RolloutStatus:
        """The rollout's status now."""
        return self.engine.status

    def abort(self, reason: str = "aborted by request") -> None:
        """Abort: roll back the devices reached, notify no more."""
        self.engine.request_abort(reason)


class Fleet:
    """The host's handle on a fleet: a broker, a store and a fleet name (topic prefix)."""

    def __init__(
        self,
        broker: str | MqttOptions | None = None,
        store: Store | str | None = None,
        fleet: str = "default",
        *,
        username: str | None = None,
        password: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        trusted_keys: Sequence[str | Path] | None = None,
        worker: str | None = None,
        lease_s: float = DEFAULT_LEASE_S,
    ) -> None:
        """`worker` names this host process among several on one store (`edgefleet serve --worker`):
        it owns the rollouts it starts through a lease of `lease_s` seconds and takes over those of a
        dead worker. Default: HOST-PID."""
        from edgefleet.agent.core.protocol import valid_name

        if not valid_name(fleet):
            raise FleetError(f"fleet name {fleet!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if isinstance(broker, MqttOptions):
            self.options = broker
        else:
            self.options = MqttOptions(
                broker or default_broker_url(),
                username=username,
                password=password,
                tls_ca=tls_ca,
                tls_cert=tls_cert,
                tls_key=tls_key,
            )
        self._owns_store = not isinstance(store, Store)
        self.store = store if isinstance(store, Store) else Store(store)
        self.fleet = fleet
        if trusted_keys is None:
            default = edgefleet_home() / "keys" / "fleet.pub"
            trusted_keys = [default] if default.is_file() else []
        self.trusted_keys = list(trusted_keys)
        # Commands for this fleet are signed with the online key beside a trusted fleet key (`keys init`
        # writes fleet.pub and online.key into one folder): agents refuse unsigned commands by default.
        use_command_keys(fleet, self.trusted_keys)
        if worker is not None and not valid_name(worker):
            raise FleetError(f"worker name {worker!r}: use 1-128 letters, digits, '.', '_' or '-'")
        if lease_s <= 2.0:
            raise FleetError(f"a rollout lease of {lease_s:g} s is too short: use more than 2 s")
        self.worker = worker
        self.owner = worker or f"{socket.gethostname()}-{os.getpid()}"[:128]
        self.lease_s = lease_s
        self._ingest: Ingest | None = None
        self._handles: dict[str, RolloutHandle] = {}
        self._takeover_stop = threading.Event()
        self._takeover_thread: threading.Thread | None = None

    # ---- registry -----------------------------------------------------------------------------

    def refresh(self) -> int:
        """Read every device's retained state from the broker into the store; returns how many."""
        return registry.refresh(self.store, self.options, self.fleet)

    def devices(self, refresh: bool = True) -> list[dict[str, Any]]:
        """Every known device with online, profile, tags, versions, active and desired model."""
        if refresh:
            self.refresh()
        return self.store.devices(self.fleet)

    def differences(self) -> list[dict[str, Any]]:
        """Devices whose reported model is not the desired one."""
        return registry.differences(self.store, self.fleet)

    def push_rotation(
        self, statement: str | Path | bytes | dict[str, Any], to: str = "all", timeout_s: float = 30.0
    ) -> dict[str, Any]:
        """Send a key rotation (`edgefleet keys rotate -o FILE`) to the devices `to` selects; outcome per device."""
        from edgefleet.sdk.fleet.rotation import push_rotation

        return push_rotation(statement, to, broker=self.options, fleet=self.fleet, timeout_s=timeout_s)

    # ---- deploy -------------------------------------------------------------------------------

    def plan(
        self,
        bundles: Iterable[str | Path],
        to: str,
        *,
        strategy: str = "all",
        skip_unmatched: bool = False,
        refresh: bool = True,
        skip_offline: bool = False,
    ) -> dict[str, Any]:
        """Check a deploy without sending anything: bundles by profile, devices, waves, devices without a bundle.

        Raises BundleRefused, SelectorError, StrategyError or RolloutConflict with the reason.
        """
        strat = parse_strategy(strategy)
        selector = parse_selector(to)
        by_profile = load_bundles(
            bundles, trusted_keys=self.trusted_keys, unpack_root=edgefleet_home() / "bundles"
        )
        if refresh:
            self.refresh()
        rows = {d["device_id"]: d for d in self.store.devices(self.fleet)}
        targets = resolve(selector, list(rows.values()))
        offline = sorted(d for d in targets if not rows[d].get("online"))
        if skip_offline:
            # Otherwise an offline device is told anyway: its command waits in the broker (persistent
            # session) and the rollout waits for it up to the device timeout.
            if offline and len(offline) == len(targets):
                raise BundleRefused(
                    f"every selected device is offline ({', '.join(offline)}); nothing to deploy to. "
                    "Leave out --skip-offline to wait for them up to the device timeout"
                )
            targets = [d for d in targets if d not in offline]
        unmatched = {d: rows[d].get("profile") for d in targets if rows[d].get("profile") not in by_profile}
        if unmatched and (not skip_unmatched or len(unmatched) == len(targets)):
            listed = ", ".join(f"{d} ({p or 'profile unknown'})" for d, p in sorted(unmatched.items()))
            have = ", ".join(sorted(by_profile))
            raise BundleRefused(
                f"no bundle for the profile of {listed}; the bundles given are for {have}. Build one per "
                "profile (`edgefleet build --profile NAME`)"
                + ("" if len(unmatched) == len(targets) else ", or pass --skip-unmatched to leave them out")
            )
        busy = self.store.devices_in_active_rollouts(self.fleet)
        clash = {d: busy[d] for d in targets if d in busy}
        if clash:
            listed = ", ".join(f"{d} (rollout {r})" for d, r in sorted(clash.items()))
            raise RolloutConflict(
                f"already in a rollout that has not ended: {listed}; wait for it, or abort it with "
                "`edgefleet rollout ID --abort`"
            )
        matched = [d for d in targets if d not in unmatched]
        # Canary waves go first to devices that are online now, so the first wave answers quickly.
        order = sorted(matched, key=lambda d: (not rows[d].get("online"), d))
        waves = strat.plan(order)
        return {
            "strategy": strat,
            "selector": str(selector),
            "bundles": by_profile,
            "waves": waves,
            "unmatched": unmatched,
            "profiles": {d: rows[d].get("profile") for d in targets},
            "skipped_offline": offline if skip_offline else [],
        }

    def deploy(
        self,
        bundles: Iterable[str | Path] | str | Path,
        to: str,
        *,
        strategy: str = "all",
        soak_s: float = 0.0,
        timeout_s: float = 600.0,
        rules: AbortRules | None = None,
        skip_unmatched: bool = False,
        skip_offline: bool = False,
        chunk_size: int | None = None,
        ready_timeout_s: float = 10.0,
        delta: bool = True,
        wait: bool = True,
        on_change: Callable[[EngineView], None] | None = None,
        rollout_id: str | None = None,
        min_accuracy: float | None = None,
        min_agreement: float | None = None,
        min_fidelity: float | None = None,
    ) -> RolloutHandle:
        """Start a rollout of `bundles` (one per profile) to the devices `to` selects.

        Everything is checked first (bundles verify, selector, profiles, no device in another rollout);
        a refusal sends nothing. With `delta`, a device that runs an earlier version of the same model
        and can apply patches gets a bsdiff4 patch instead of the model file. With `wait` the call returns
        when the rollout ended; otherwise it runs on a background thread and the handle's `wait()` joins
        it. Offline devices are told too and waited for up to `timeout_s`; `skip_offline` leaves them
        out. `rollout_id` (default: generated) is also the deploy id every device sees. `min_accuracy`,
        `min_agreement`, `min_fidelity` set the telemetry gate's floors (over those of `rules`; a floor
        not set comes from the bundle's health policy).
        """
        from edgefleet.agent.core.protocol import valid_name

        if isinstance(bundles, (str, Path)):
            bundles = [bundles]
        if soak_s < 0 or timeout_s <= 0:
            raise FleetError("soak must be >= 0 s and the device timeout > 0 s")
        if rollout_id is not None and (
            not valid_name(rollout_id) or self.store.rollout(rollout_id, devices=False) is not None
        ):
            raise RolloutConflict(
                f"rollout id {rollout_id!r} is taken or malformed: use a new id of 1-128 letters, digits, "
                "'.', '_' or '-', or leave it out to get a generated one"
            )
        plan = self.plan(
            bundles, to, strategy=strategy, skip_unmatched=skip_unmatched, skip_offline=skip_offline
        )
        gates = {"min_accuracy": min_accuracy, "min_agreement": min_agreement, "min_fidelity": min_fidelity}
        the_rules = rules_with(rules or AbortRules(), {k: v for k, v in gates.items() if v is not None})
        ids: dict[str, int] = {}
        for profile, b in plan["bundles"].items():
            ids[profile] = self._register(b)
        if delta:
            self._precompute_patches(plan, ids)
        targets: list[tuple[str, int | None, int]] = []
        for wave, members in enumerate(plan["waves"]):
            targets += [(d, ids[plan["profiles"][d]], wave) for d in members]
        targets += [(d, None, 0) for d in sorted(plan["unmatched"])]
        rollout_id = rollout_id or f"r-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        settings = {
            "bundles": ids,
            "soak_s": soak_s,
            "timeout_s": timeout_s,
            "ready_timeout_s": ready_timeout_s,
            "chunk_size": chunk_size,
            "delta": delta,
            "delta_dir": str(edgefleet_home() / "deltas"),
            "rules": the_rules.to_dict(),
            "wave": -1,
            "waves": len(plan["waves"]),
        }
        self.store.create_rollout(
            rollout_id,
            fleet=self.fleet,
            selector=plan["selector"],
            strategy=plan["strategy"].text,
            settings=settings,
            targets=targets,
            owner=self.owner,
            lease_s=self.lease_s,
        )
        return self._drive(rollout_id, wait=wait, on_change=on_change)

    def _precompute_patches(self, plan: dict[str, Any], ids: dict[str, int]) -> None:
        """Compute delta patches now (bsdiff4 takes seconds on a 20 MB model), before the engine's clock runs.

        They are cached by the two files' hashes, so the engine's own planning finds them ready.
        """
        from edgefleet.sdk.fleet.delta import plan_patch, supports_delta

        rows = {d["device_id"]: d for d in self.store.devices(self.fleet)}
        known: dict[str, list[dict[str, Any]]] = {}
        for members in plan["waves"]:
            for device_id in members:
                row = rows.get(device_id) or {}
                if not supports_delta(row):
                    continue
                brow = self.store.bundle(ids[plan["profiles"][device_id]])
                if brow is None:
                    continue
                bundles = known.setdefault(brow["name"], self.store.bundles(str(brow["name"])))
                try:
                    plan_patch(row, brow, bundles, edgefleet_home() / "deltas")
                except (OSError, ValueError):
                    continue  # the engine falls back to the full file

    def _register(self, bundle: ResolvedBundle) -> int:
        return self.store.add_bundle(
            name=bundle.name,
            version=bundle.version,
            profile=bundle.profile,
            manifest_sha256=bundle.manifest_sha256,
            path=str(bundle.path),
            size_bytes=bundle.size_bytes,
            manifest=bundle.manifest,
        )

    def _drive(
        self, rollout_id: str, *, wait: bool, on_change: Callable[[EngineView], None] | None
    ) -> RolloutHandle:
        engine = RolloutEngine(
            self.store, self.options, rollout_id, on_change=on_change, owner=self.owner, lease_s=self.lease_s
        )
        handle = RolloutHandle(rollout_id, engine)
        self._handles[rollout_id] = handle
        if wait:
            engine.run()
            return handle

        def run() -> None:
            try:
                engine.run()
            except BaseException as exc:
                handle.error = exc

        handle.thread = threading.Thread(target=run, name=f"rollout-{rollout_id}", daemon=True)
        handle.thread.start()
        return handle

    # ---- rollouts -----------------------------------------------------------------------------

    def rollout(self, rollout_id: str) -> dict[str, Any]:
        """One rollout with its devices; RolloutNotFound when unknown."""
        row = self.store.rollout(rollout_id)
        if row is None or row["fleet"] != self.fleet:
            recent = [r["id"] for r in self.store.rollouts(self.fleet)[:5]]
            raise RolloutNotFound(
                f"no rollout {rollout_id!r} in fleet {self.fleet!r}; recent: {', '.join(recent) or 'none'}"
            )
        return row

    def rollouts(self, status: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Rollouts of this fleet, newest first."""
        return self.store.rollouts(self.fleet, status=status)

    def resume(
        self, rollout_id: str, *, wait: bool = True, on_change: Callable[[EngineView], None] | None = None
    ) -> RolloutHandle:
        """Carry on a rollout whose host process died; refused while another process drives it."""
        row = self.rollout(rollout_id)
        if row["status"] in ENDED_ROLLOUT:
            raise RolloutConflict(f"rollout {rollout_id} already ended ({row['status']}); nothing to resume")
        if engine_alive(row) or not self._claim_when_free(rollout_id):
            raise RolloutConflict(
                f"rollout {rollout_id} is driven by another process right now (heartbeat fresh or "
                f"lease held by {row.get('owner')!r}); watch it with `edgefleet rollout ID`"
            )
        return self._drive(rollout_id, wait=wait, on_change=on_change)

    def _claim_when_free(self, rollout_id: str) -> bool:
        """Take a rollout's lease, waiting out what is left of a dead owner's (its heartbeat went stale first)."""
        deadline = time.time() + self.lease_s + 1.0
        while not self.store.claim_rollout(rollout_id, self.owner, self.lease_s):
            row = self.store.rollout(rollout_id, devices=False) or {}
            expires = float(row.get("lease_expires") or 0.0)
            if engine_alive(row) or expires > deadline or time.time() >= deadline:
                return False  # alive again, or a lease longer than ours: a live owner
            time.sleep(min(0.5, max(0.05, expires - time.time())))
        return True

    def resume_all(self) -> list[RolloutHandle]:
        """Take over, in the background, every unfinished rollout no live worker drives.

        A rollout qualifies once its owner's lease ran out and its heartbeat went stale; the lease is
        taken with one conditional UPDATE, so of several workers trying at once exactly one drives it.
        The engine carries on from the stored per-device state (`RolloutEngine` docstring).
        """
        out = []
        for row in self.store.orphaned_rollouts(self.fleet):
            rid = str(row["id"])
            mine = self._handles.get(rid)
            if (
                mine is not None
                and not mine.engine.lost_lease
                and (mine.thread is None or mine.thread.is_alive())
            ):
                continue  # this process drives it already
            if engine_alive(row) or not self.store.claim_rollout(rid, self.owner, self.lease_s):
                continue
            if row.get("owner") not in (None, self.owner):
                logging.getLogger(__name__).warning(
                    "rollout %s: worker %s stopped renewing its lease; %s takes it over",
                    rid,
                    row.get("owner"),
                    self.owner,
                )
            out.append(self._drive(rid, wait=False, on_change=None))
        return out

    def start_takeovers(self, every_s: float | None = None) -> None:
        """Check for orphaned rollouts in the background (every `every_s`, default a third of the lease)."""
        if self._takeover_thread is not None:
            return
        self._takeover_stop.clear()  # a Fleet closed and started again checks again
        period = every_s or self.lease_s / 3

        def loop() -> None:
            while not self._takeover_stop.wait(period):
                try:
                    self.resume_all()
                except Exception:  # a store or broker hiccup: the next round tries again
                    logging.getLogger(__name__).exception("rollout takeover check failed")

        self._takeover_thread = threading.Thread(target=loop, name="edgefleet-takeovers", daemon=True)
        self._takeover_thread.start()

    def abort(self, rollout_id: str, reason: str = "aborted by request", *, wait: bool = False) -> None:
        """Abort a rollout: the engine driving it (here or in another process) rolls back the devices reached."""
        row = self.rollout(rollout_id)
        if row["status"] in ENDED_ROLLOUT:
            raise RolloutConflict(
                f"rollout {rollout_id} already ended ({row['status']}); there is nothing to abort"
            )
        handle = self._handles.get(rollout_id)
        if (
            handle is not None
            and handle.engine.status not in ENDED_ROLLOUT
            and (handle.thread is None or handle.thread.is_alive())
        ):
            handle.abort(reason)
            if wait:
                handle.wait()
            return
        if not self.store.set_rollout_status(
            rollout_id,
            RolloutStatus.ABORTING,
            reason,
            only_from=(RolloutStatus.PENDING, RolloutStatus.RUNNING),
        ):
            now = self.rollout(rollout_id)["status"]
            if now in ENDED_ROLLOUT:
                raise RolloutConflict(
                    f"rollout {rollout_id} already ended ({now}); there is nothing to abort"
                )
            return
        if not engine_alive(row):
            # Nobody drives it: this process performs the rollback itself.
            self._handles.pop(rollout_id, None)
            self._drive(rollout_id, wait=wait, on_change=None)

    # ---- telemetry ----------------------------------------------------------------------------

    def telemetry(
        self, device_id: str, *, since: float | None = None, bucket_s: float = 60.0
    ) -> dict[str, Any]:
        """A device's latest telemetry and its latency/accuracy series per model version."""
        device = self.store.device(self.fleet, device_id)
        if device is None:
            known = [d["device_id"] for d in self.store.devices(self.fleet)][:20]
            raise RolloutNotFound(
                f"unknown device {device_id!r}; known devices: {', '.join(known) or 'none yet'}"
            )
        latest = self.store.latest_telemetry(self.fleet, device_id, limit=1)
        versions = sorted(
            {
                (r["model_name"], r["model_version"])
                for r in self.store.latest_telemetry(self.fleet, device_id, limit=1000)
                if r["model_name"]
            },
            key=lambda mv: (str(mv[0]), mv[1] or 0),
        )
        series = {
            f"{name} v{version}": [
                p.__dict__
                for p in self.store.series(
                    self.fleet,
                    device_id=device_id,
                    model_name=name,
                    model_version=version,
                    since=since,
                    bucket_s=bucket_s,
                )
            ]
            for name, version in versions
        }
        return {
            "device": device,
            "latest": latest[0] if latest else None,
            "series": series,
            "gaps": [g.__dict__ for g in self.store.gaps(self.fleet, device_id)],
        }

    def latest_report(self, device_id: str) -> Telemetry | None:
        """The device's newest stored telemetry, typed again (the store keeps its flat form), or None."""
        rows = self.store.latest_telemetry(self.fleet, device_id, limit=1)
        if not rows:
            return None
        row = rows[0]
        seq = row.get("seq")
        return Telemetry.from_metrics(
            device_id, seq if isinstance(seq, int) else -1, float(row["ts"]), row["payload"] or {}
        )

    # ---- ingest -------------------------------------------------------------------------------

    def start_ingest(
        self,
        share_group: str | None = None,
        client_id: str | None = None,
        *,
        partition: tuple[int, int] | None = None,
        ingest_lease_s: float | None = None,
    ) -> Ingest:
        """Start writing the fleet's state, events and telemetry into the store (in the background).

        With this Fleet's `worker` name and a `share_group` (MQTT shared subscription) or a `partition`
        (K, N) of the devices, it is one of several workers: its session is leased in the store and it
        adopts a dead peer's. It also resumes rollouts nobody drives, now and every third of the lease.
        """
        if self._ingest is None:
            extra: dict[str, Any] = {}
            if ingest_lease_s is not None:
                extra["lease_s"] = ingest_lease_s
            self._ingest = Ingest(
                self.store,
                self.options,
                self.fleet,
                share_group=share_group,
                client_id=client_id,
                worker=self.worker if partition is None else None,
                partition=partition,
                **extra,
            )
            self._ingest.start()
            self.resume_all()
            self.start_takeovers()
        return self._ingest

    def federate(self, bundle: str | Path, to: str, out: str | Path, **options: Any) -> dict[str, Any]:
        """Federated fine-tuning of `bundle`'s head on the devices `to` selects → a new signed bundle in `out`.

        `options`: the FederateSettings fields (rounds, clients_per_round, local_epochs, lr, min_clients,
        round_timeout_s, dp_epsilon, dp_delta, dp_noise, dp_clip, ...) and key, head, eval_path, deploy,
        on_round; see edgefleet.sdk.federated.run.federate. Returns the report (OUT/report.json).
        """
        from dataclasses import fields

        from edgefleet.sdk.federated.run import FederateSettings, federate

        names = {f.name for f in fields(FederateSettings)}
        settings = FederateSettings(**{k: options.pop(k) for k in list(options) if k in names})
        return federate(self, bundle, to, out, settings, **options)

    def close(self) -> None:
        """Stop ingest and release the store if this Fleet opened it (running rollouts are left to resume)."""
        self._takeover_stop.set()
        if self._takeover_thread is not None:
            self._takeover_thread.join(10)
            self._takeover_thread = None
        if self._ingest is not None:
            self._ingest.close()
            self._ingest = None
        if self._owns_store:
            self.store.close()
