"""`--bad-model`: a release with a label-map bug, caught by the canary's telemetry and rolled back."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rich.table import Table

from edgefleet.sdk.demo.base import fmt_pct
from edgefleet.sdk.demo.bundles import mislabeled_copy, restamp
from edgefleet.sdk.demo.options import BAD_CLASSES, FLEET, MODEL_NAME, BadOutcome, DemoError
from edgefleet.sdk.demo.rollout import RolloutSteps

if TYPE_CHECKING:
    from torch import nn

    from edgefleet.sdk.zoo import DigitsSplit


class BadReleaseSteps(RolloutSteps):
    """`--bad-model`: ship a release with a label-map bug and show the canary's telemetry abort it."""

    def _bad_release(self, model: nn.Module, split: DigitsSplit, good_version: int) -> None:
        from edgefleet.sdk.build.builder import build
        from edgefleet.sdk.build.plan import PlanOptions
        from edgefleet.sdk.trust.keys import load_private_key
        from edgefleet.sdk.zoo import accuracy

        assert self.fleet is not None and self.store is not None
        self.console.rule("[bold]--bad-model: a release with a label-map bug")
        key = load_private_key(self.key_private)
        bad = mislabeled_copy(model)
        host_acc = accuracy(bad, split.x_test, split.y_test)
        version = max(int(time.strftime("%Y%m%d%H%M%S")), good_version + 1)
        bundles: dict[str, Path] = {}
        min_manifest: Optional[float] = None
        with self.step("build the bad release") as info:
            for profile in dict.fromkeys(p for _, p in self.devices):
                result = build(
                    bad,
                    profile,
                    calib=(split.x_train, split.y_train),
                    eval=(split.x_test, split.y_test),
                    out=self.state / "bundles" / f"{MODEL_NAME}-bad-{profile}",
                    plan=PlanOptions(
                        prune_levels=(), mixed_precision=False, tflite=False, only=("onnx-fp32",)
                    ),
                    private_key=key,
                    name=MODEL_NAME,
                    overwrite=True,
                )
                assert result.bundle_dir is not None
                restamp(result.bundle_dir, version, key)
                bundles[profile] = result.bundle_dir
                manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
                health = manifest.get("health", {})
                # `min_quality` names the floor of `health.metric`; manifests before it said `min_accuracy`.
                min_manifest = health.get("min_quality", health.get("min_accuracy"))
            info["detail"] = (
                f"v{version}: output rows of digits {', '.join(map(str, BAD_CLASSES))} rotated; "
                f"{host_acc:.2%} on the held-out digits; its signed health policy asks for ≥ "
                f"{fmt_pct(min_manifest)}, so devices accept it"
            )
        strategy = f"canary:{self.opts.canary_pct}"
        self.console.print(
            f"  deploying v{version} with {strategy}; the fleet's floor is {self.opts.min_accuracy:.0%}: the "
            "canary's telemetry must catch it",
            highlight=False,
        )
        start = time.monotonic()
        handle = self.fleet.deploy(
            list(bundles.values()),
            "all",
            strategy=strategy,
            # Long enough for several telemetry windows of the canary before the next wave would start.
            soak_s=max(20.0, 10 * self.opts.telemetry_interval_s),
            timeout_s=self.opts.timeout_s,
            rules=self._rules(),
            wait=False,
        )
        status = self._watch(handle, f"rollout {handle.id}")
        row = self.fleet.rollout(handle.id)
        devices = {d["device_id"]: d["status"] for d in row["devices"]}
        reasons = {d["device_id"]: d.get("reason") for d in row["devices"]}
        canary = sorted(d["device_id"] for d in row["devices"] if int(d.get("wave") or 0) == 0)
        outcome = BadOutcome(
            rollout_id=handle.id,
            version=version,
            status=status,
            reason=row.get("reason"),
            devices=devices,
            reasons=reasons,
            canary=canary,
            host_accuracy=round(host_acc, 4),
            min_accuracy_manifest=min_manifest,
        )
        self.result.bad = outcome
        self.result.timings_s["bad rollout"] = round(time.monotonic() - start, 2)
        # What the canary measured while it served the bad version (a one-device canary: its row).
        for r in self._device_rows(version, 0.0):
            if r.device_id in canary:
                outcome.canary_live_accuracy = r.live_accuracy
                outcome.canary_eval_accuracy = r.eval_accuracy
                outcome.canary_requests = r.requests
        if status != "aborted":
            self.result.problems.append(
                f"the bad release was not stopped: rollout {handle.id} ended {status} ({row.get('reason')})"
            )
            return
        self.console.print(
            f"[green]✓[/] rollout {handle.id} [bold red]aborted[/]: {row.get('reason')}", highlight=False
        )

        def back_on_good() -> dict[str, Optional[int]] | None:
            assert self.store is not None
            rows = {r["device_id"]: r.get("active_version") for r in self.store.devices(FLEET)}
            want = {d for d, _ in self.devices}
            return rows if all(rows.get(d) == good_version for d in want) else None

        try:
            running = self._wait(back_on_good, 30, f"every device back on v{good_version}")
        except DemoError as exc:
            self.result.problems.append(exc.reason)
            running = {r["device_id"]: r.get("active_version") for r in self.store.devices(FLEET)}
        outcome.running_after = {d: running.get(d) for d, _ in self.devices}
        table = Table(title=f"bad release v{version}: what happened on each device")
        for col in ("device", "wave", "rollout status", "why", "runs now"):
            table.add_column(col)
        for device_id, _ in self.devices:
            st = devices.get(device_id, "?")
            colour = {"rolled-back": "yellow", "not-notified": "dim", "deployed": "red"}.get(st, "white")
            now_v = outcome.running_after.get(device_id)
            why = (
                "canary: installed (its health check passed) and served, rolled back by the abort"
                if st == "rolled-back"
                else "never sent anything (later wave)"
                if st == "not-notified"
                else str(reasons.get(device_id) or "")
            )
            table.add_row(
                device_id,
                "canary" if device_id in canary else "rest",
                f"[{colour}]{st}[/]",
                why,
                f"v{now_v}" + (" (good)" if now_v == good_version else ""),
            )
        self.console.print(table)
        if outcome.canary_live_accuracy is not None or outcome.canary_eval_accuracy is not None:
            self.console.print(
                f"  the canary measured v{version}: live accuracy {fmt_pct(outcome.canary_live_accuracy)}, eval-set "
                f"{fmt_pct(outcome.canary_eval_accuracy)} over {outcome.canary_requests} requests, below the "
                f"{self.opts.min_accuracy:.0%} floor",
                highlight=False,
            )
        expected = {d: ("rolled-back" if d in canary else "not-notified") for d, _ in self.devices}
        wrong = {d: s for d, s in devices.items() if expected.get(d) != s}
        if wrong:
            self.result.problems.append(f"unexpected device statuses after the abort: {wrong}")
