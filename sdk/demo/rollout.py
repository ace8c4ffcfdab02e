"""The good release: build per profile, roll out with a canary, and tabulate what the devices measured."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgefleet.sdk.demo.base import DemoBase, fmt_number, fmt_pct
from edgefleet.sdk.demo.bundles import restamp
from edgefleet.sdk.demo.options import ENDED_DEVICE, FLEET, MIN_WINDOWS, MODEL_NAME, DemoError, DeviceRow

if TYPE_CHECKING:
    from torch import nn

    from edgefleet.sdk.fleet.client import RolloutHandle
    from edgefleet.sdk.zoo import DigitsSplit


class RolloutSteps(DemoBase):
    """Build a release per profile, roll it out, and report what every device measured."""

    def _build(self, model: nn.Module, split: DigitsSplit) -> tuple[int, dict[str, Path]]:
        from edgefleet.sdk.build.builder import build
        from edgefleet.sdk.build.plan import PlanOptions
        from edgefleet.sdk.trust.keys import load_private_key

        key = load_private_key(self.key_private)
        version = int(time.strftime("%Y%m%d%H%M%S"))
        # A short plan: fp32 baseline, graph-optimised fp32, fp16 where the profile has it, and static
        # INT8 with one calibration. The full search (pruning, TFLite) takes minutes; see docs/build.md.
        plan = PlanOptions(
            prune_levels=(),
            mixed_precision=False,
            tflite=False,
            static_calibrations=("minmax",),
            only=("onnx-fp32-opt", "onnx-fp16", "onnx-int8-static-minmax"),
        )
        bundles: dict[str, Path] = {}
        for profile in dict.fromkeys(p for _, p in self.devices):
            with self.step(f"build for {profile}") as info:
                result = build(
                    model,
                    profile,
                    calib=(split.x_train, split.y_train),
                    eval=(split.x_test, split.y_test),
                    max_accuracy_drop=0.01,
                    out=self.state / "bundles" / f"{MODEL_NAME}-{profile}",
                    plan=plan,
                    private_key=key,
                    name=MODEL_NAME,
                    overwrite=True,
                )
                assert result.bundle_dir is not None
                restamp(result.bundle_dir, version, key)
                bundles[profile] = result.bundle_dir
                chosen = result.chosen
                tried = ", ".join(f"{c.id} {c.status}" for c in result.candidates)
                acc = chosen.quality.value if chosen.quality else float("nan")
                p50 = chosen.latency.p50_ms if chosen.latency else float("nan")
                self.result.builds[profile] = {
                    "chosen": chosen.id,
                    "size_bytes": chosen.size_bytes,
                    "accuracy": acc,
                    "host_p50_ms": p50,
                    "candidates": {c.id: c.status for c in result.candidates},
                }
                info["detail"] = (
                    f"chose [bold]{chosen.id}[/] ({(chosen.size_bytes or 0) / 1024:.0f} KB, accuracy {acc:.2%}, "
                    f"host p50 {p50:.3f} ms); tried {tried}"
                )
        self.result.version = version
        self.console.print(
            f"  release [bold]{MODEL_NAME} v{version}[/]: {len(bundles)} signed bundles in {self.state / 'bundles'}",
            highlight=False,
        )
        return version, bundles

    def _watch(self, handle: RolloutHandle, title: str) -> str:
        """Show a rollout's progress bar and each device's status changes until it ends; returns its status."""
        from edgefleet.agent.core.codes import ENDED_ROLLOUT

        assert self.fleet is not None
        total = len(self.devices)
        seen: dict[str, str] = {}
        deadline = time.monotonic() + self.opts.timeout_s + 60
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[phase]}"),
            TimeElapsedColumn(),
            console=self.console,
        ) as bar:
            task = bar.add_task(title, total=total, phase="")
            while True:
                view = handle.engine.view()
                for device, status in sorted(view.devices.items()):
                    if seen.get(device) != status:
                        seen[device] = status
                        colour = {
                            "deployed": "green",
                            "rolled-back": "yellow",
                            "rejected": "red",
                            "not-notified": "dim",
                        }.get(status, "cyan")
                        bar.console.print(f"    {device:<22} [{colour}]{status}[/]", highlight=False)
                done = sum(1 for s in view.devices.values() if s in ENDED_DEVICE)
                phase = f"wave {max(view.wave, 0) + 1}/{view.waves} · {view.status}"
                if view.soak_left_s > 0 and view.status == "running":
                    phase += f" · soak {view.soak_left_s:.0f} s"
                bar.update(task, completed=done, phase=phase)
                if view.status in ENDED_ROLLOUT or handle.engine.status in ENDED_ROLLOUT:
                    break
                if handle.thread is not None and not handle.thread.is_alive():
                    break
                self._check_children()
                if time.monotonic() > deadline:
                    handle.abort("the demo timed out waiting for the rollout")
                    raise DemoError("timeout", f"rollout {handle.id} did not end in time")
                time.sleep(0.2)
        return handle.wait(30)

    def _rules(self) -> Any:
        from edgefleet.sdk.fleet.strategy import AbortRules

        # The fleet's own accuracy floor, on top of each manifest's health policy. The rule averages
        # windows unweighted, and the first window after a switch may hold only a few requests: with
        # five windows first, one wrong answer in a tiny window cannot abort a good release.
        return AbortRules(min_accuracy=self.opts.min_accuracy, min_samples=MIN_WINDOWS)

    def _deploy_good(self, bundles: dict[str, Path], version: int) -> None:
        assert self.fleet is not None
        strategy = f"canary:{self.opts.canary_pct}"
        self.console.rule(f"[bold]deploy {MODEL_NAME} v{version} — {strategy}")
        self.console.print(
            f"  abort rules: any failed device; telemetry p95 above the profile budget; eval-set or live "
            f"accuracy below {self.opts.min_accuracy:.0%} (the fleet's floor). Local traffic: held-out digits "
            "to each device's /v1/infer, true labels to /v1/feedback.",
            highlight=False,
        )
        start = time.monotonic()
        handle = self.fleet.deploy(
            list(bundles.values()),
            "all",
            strategy=strategy,
            # The canary serves for a few telemetry windows before the rest are told.
            soak_s=max(3.0, (MIN_WINDOWS + 1) * self.opts.telemetry_interval_s),
            timeout_s=self.opts.timeout_s,
            rules=self._rules(),
            wait=False,
        )
        self.result.rollout_id = handle.id
        status = self._watch(handle, f"rollout {handle.id}")
        row = self.fleet.rollout(handle.id)
        self.result.rollout_status, self.result.rollout_reason = status, row.get("reason")
        took = time.monotonic() - start
        self.result.timings_s["rollout"] = round(took, 2)
        if status != "succeeded":
            raise DemoError(
                "rollout-failed",
                f"the rollout of the good model ended {status}: {row.get('reason')}; device logs are in "
                f"{self.state / 'logs'}",
            )
        sent = handle.engine.stats.total_bytes
        self.console.print(
            f"[green]✓[/] rollout {handle.id} succeeded on {len(self.devices)} devices: the host published "
            f"{sent / 1024:.0f} KiB in all (each model broadcast once per wave) [dim]({took:.1f} s)[/]",
            highlight=False,
        )

    def _device_rows(self, version: int, since: float) -> list[DeviceRow]:
        assert self.store is not None
        rows = {r["device_id"]: r for r in self.store.devices(FLEET)}
        out = []
        for device_id, profile in self.devices:
            reg = rows.get(device_id, {})
            telemetry = [
                t
                for t in self.store.latest_telemetry(FLEET, device_id, limit=500)
                if t["model_name"] == MODEL_NAME and t["model_version"] == version and t["ts"] >= since
            ]
            points = self.store.series(
                FLEET,
                device_id=device_id,
                model_name=MODEL_NAME,
                model_version=version,
                since=since,
                bucket_s=1e12,
            )
            point = points[0] if points else None
            out.append(
                DeviceRow(
                    device_id=device_id,
                    profile=profile,
                    online=bool(reg.get("online")),
                    model=reg.get("active_model"),
                    version=reg.get("active_version"),
                    windows=sum(1 for t in telemetry if (t["count"] or 0) > 0),
                    requests=point.count if point else 0,
                    p50_ms=point.p50_ms if point else None,
                    p95_ms=point.p95_ms if point else None,
                    live_accuracy=point.live_accuracy if point else None,
                    eval_accuracy=point.eval_accuracy if point else None,
                )
            )
        return out

    def _report_devices(self, version: int) -> None:
        since = time.time()
        needed = 3
        with self.step("telemetry from every device") as info:

            def filled() -> list[DeviceRow] | None:
                rows = self._device_rows(version, since)
                ready = all(
                    r.version == version
                    and r.windows >= needed
                    and r.p95_ms is not None
                    and r.live_accuracy is not None
                    and r.eval_accuracy is not None
                    for r in rows
                )
                return rows if ready else None

            rows = self._wait(filled, 60, f"{needed} telemetry windows with traffic from every device")
            info["detail"] = (
                f"{sum(r.requests for r in rows)} inferences in {sum(r.windows for r in rows)} windows"
            )
        self.result.devices = rows
        table = Table(
            title=f"what each device measured on {MODEL_NAME} v{version} (request-weighted over the windows)"
        )
        for col, justify in (
            ("device", "left"),
            ("profile", "left"),
            ("model", "left"),
            ("requests", "right"),
            ("p50 ms", "right"),
            ("p95 ms", "right"),
            ("live acc.", "right"),
            ("eval-set acc.", "right"),
            ("state", "left"),
        ):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for r in rows:
            table.add_row(
                r.device_id,
                r.profile,
                f"{r.model} v{r.version}",
                str(r.requests),
                fmt_number(r.p50_ms, 3),
                fmt_number(r.p95_ms, 3),
                fmt_pct(r.live_accuracy),
                fmt_pct(r.eval_accuracy),
                "[green]online[/]" if r.online else "[red]offline[/]",
            )
        self.console.print(table)
        self.console.print(
            "  live acc. = agreement with the true labels sent as feedback; eval-set acc. = the bundle's "
            "eval.npz re-scored on the device; latency is the agent's own inference timing.",
            highlight=False,
        )
