"""`Demo`: one run of the whole loop, step by step; `run_demo` is its entry point."""

from __future__ import annotations

import shutil
import time
from typing import TYPE_CHECKING, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from edgefleet.sdk.demo.bad_release import BadReleaseSteps
from edgefleet.sdk.demo.base import known_errors
from edgefleet.sdk.demo.options import MARKER, DemoError, DemoInterrupted, DemoOptions, DemoResult
from edgefleet.sdk.demo.session import edgefleet_home, log_to, prepare_state_dir, signals_as_interrupt
from edgefleet.sdk.demo.stack import StackSteps
from edgefleet.sdk.demo.traffic import Traffic

if TYPE_CHECKING:
    from torch import nn

    from edgefleet.sdk.zoo import DigitsSplit


class Demo(StackSteps, BadReleaseSteps):
    """One run of the demo; `run()` returns a DemoResult and leaves nothing running (unless `keep` waits)."""

    def run(self) -> DemoResult:
        """Run every step; stop what was started (after Ctrl-C when `keep`); return what was shown."""
        self.state, self.temp_state = prepare_state_dir(self.opts.state_dir)
        (self.state / MARKER).write_text("edgefleet demo state folder; `edgefleet demo` may wipe it\n")
        self.result.state_dir = str(self.state)
        try:
            with signals_as_interrupt(), edgefleet_home(self.state / "home"), log_to(self.console):
                try:
                    self._run_steps()
                    if self.opts.keep and not self.result.problems:
                        self._keep_running()
                except DemoInterrupted:
                    self.result.interrupted = True
                    self.console.print("\n[yellow]interrupted[/]: stopping everything the demo started")
                except DemoError as exc:
                    self.result.problems.append(exc.reason)
                    self.console.print(f"[red]demo failed:[/] {exc.reason}", highlight=False)
                except known_errors() as exc:
                    # edgefleet's own errors name the problem; a traceback would hide it.
                    reason = f"{type(exc).__name__}: {exc}"
                    self.result.problems.append(reason)
                    self.console.print(f"[red]demo failed:[/] {reason}", highlight=False)
                finally:
                    self._shutdown()
        finally:
            self.result.timings_s["total"] = round(time.monotonic() - self.t0, 2)
            if self.result.problems:
                # A temp folder too: its logs are what tells why.
                self.console.print(f"logs and store kept in {self.state}", highlight=False)
            elif self.temp_state:
                shutil.rmtree(self.state, ignore_errors=True)
        self.result.ok = not self.result.problems and not (self.result.interrupted and not self.opts.keep)
        return self.result

    def _run_steps(self) -> None:
        from edgefleet.sdk.trust.keys import init_keys

        self.console.rule("[bold]edgefleet demo")
        counts: dict[str, int] = {}
        for _, profile in self.devices:
            counts[profile] = counts.get(profile, 0) + 1
        self.console.print(
            f"fleet: {', '.join(f'{n}× {p}' for p, n in counts.items())} (emulated on this machine); "
            f"state in {self.state}",
            highlight=False,
        )
        with self.step("fleet signing key") as info:
            pair = init_keys(self.state / "keys")
            self.key_private, self.key_public = pair.private_path, pair.public_path
            info["detail"] = f"Ed25519 {pair.keyid[:12]}…"
        self._start_broker()
        self._start_control_plane()
        self._start_agents()
        model, split = self._train()
        self._wait_online()
        version, bundles = self._build(model, split)
        self.traffic = Traffic(
            self.ports, split.x_test, split.y_test, interval_s=self.opts.traffic_interval_s
        ).start()
        self._deploy_good(bundles, version)
        self._report_devices(version)
        if self.opts.bad_model:
            self._bad_release(model, split, version)
        self._summary()

    def _train(self) -> tuple[nn.Module, DigitsSplit]:
        from edgefleet.sdk.zoo import accuracy, digits_cnn, digits_split, train_classifier

        title = "train the digits CNN"
        start = time.monotonic()
        import torch

        torch.manual_seed(0)
        split = digits_split(seed=0)
        with Progress(
            TextColumn("  {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.3f}"),
            console=self.console,
            transient=True,
            # A pipe or file gets the summary line only, not an empty line where the bar was.
            disable=not self.console.is_terminal,
        ) as bar:
            task = bar.add_task("epochs", total=self.opts.epochs, loss=float("nan"))

            def on_epoch(epoch: int, loss: float) -> None:
                bar.update(task, completed=epoch + 1, loss=loss)

            model = train_classifier(
                digits_cnn(), split.x_train, split.y_train, epochs=self.opts.epochs, seed=0, on_epoch=on_epoch
            )
        acc = accuracy(model, split.x_test, split.y_test)
        self.result.host_accuracy = round(acc, 4)
        took = time.monotonic() - start
        self.result.timings_s[title] = round(took, 2)
        params = sum(p.numel() for p in model.parameters())
        self.console.print(
            f"[green]✓[/] {title} — {params:,} parameters, {self.opts.epochs} epochs on {len(split.x_train)} "
            f"digits, {acc:.2%} on {len(split.x_test)} held-out digits [dim]({took:.1f} s)[/]",
            highlight=False,
        )
        return model, split

    def _summary(self) -> None:
        r = self.result
        self.console.rule()
        ok = not r.problems
        verdict = (
            "[green]the demo showed the whole loop[/]" if ok else "[red]the demo did not go as it should[/]"
        )
        self.console.print(f"{verdict} in {time.monotonic() - self.t0:.0f} s", highlight=False)
        for problem in r.problems:
            self.console.print(f"  [red]✗[/] {problem}", highlight=False)
        later = "" if self.opts.keep else " — it stops with the demo; rerun with --keep to leave it running"
        self.console.print(
            f"dashboard: [bold]{r.dashboard_url}[/]  (API: {r.dashboard_url}docs){later}",
            highlight=False,
            soft_wrap=True,
        )


def run_demo(options: DemoOptions, console: Optional[Console] = None) -> DemoResult:
    """Run the demo with `options`; returns what it showed (`ok` when it showed what it should)."""
    return Demo(options, console).run()
