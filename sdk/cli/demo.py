"""`edgefleet demo`: the whole loop on this machine, no setup (logic in `edgefleet.sdk.demo`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from edgefleet.sdk.cli.errors import fail


def register(app: typer.Typer) -> None:
    """Attach the `demo` command."""

    @app.command("demo")
    def demo(
        bad_model: bool = typer.Option(
            False,
            "--bad-model",
            help="After the good rollout, ship a release with a label-map bug and watch the canary's "
            "telemetry abort it and roll the canary back.",
        ),
        keep: bool = typer.Option(
            False, "--keep", help="Leave the fleet, traffic and dashboard running until Ctrl-C."
        ),
        port: Optional[int] = typer.Option(
            None, help="Dashboard port (default 8080, or a free one when 8080 is taken; 0: any free port)."
        ),
        state_dir: Optional[Path] = typer.Option(
            None,
            help="Folder for keys, bundles, store, device state and logs (default: a temp folder, removed "
            "after a successful run). Must be new, empty, or an earlier demo's.",
        ),
        devices: str = typer.Option(
            "rpi4b:2,rpi5:1,jetson-orin-nano:1", help="Emulated devices as PROFILE:COUNT,... (at most 16)."
        ),
        epochs: int = typer.Option(30, min=1, help="Training epochs of the digits CNN."),
        backend: str = typer.Option(
            "auto", help="Embedded broker: auto (mosquitto when on PATH, else amqtt), mosquitto or amqtt."
        ),
        min_accuracy: float = typer.Option(
            0.90, help="The fleet's accuracy floor the rollouts abort below (eval-set or live accuracy)."
        ),
        as_json: bool = typer.Option(
            False, "--json", help="Print the result as JSON on stdout (progress goes to stderr)."
        ),
    ) -> None:
        """Start a broker, the control plane and emulated devices; train, build, canary-deploy and show telemetry."""
        from rich.console import Console

        from edgefleet.sdk.demo import DemoError, DemoOptions, run_demo

        console = Console(stderr=as_json)
        if not console.is_terminal:
            # Wide enough for the tables when the output goes to a file or a pipe.
            console = Console(stderr=as_json, width=max(console.width, 150))
        options = DemoOptions(
            state_dir=state_dir,
            port=port,
            keep=keep,
            bad_model=bad_model,
            devices=devices,
            epochs=epochs,
            backend=backend,
            min_accuracy=min_accuracy,
        )
        try:
            result = run_demo(options, console)
        except DemoError as exc:
            raise fail(exc.reason, 2, prefix="demo refused:") from None
        if as_json:
            sys.stdout.write(json.dumps(result.to_dict(), indent=2, default=str) + "\n")
        if result.interrupted and not keep:
            raise typer.Exit(130)
        raise typer.Exit(0 if result.ok else 1)
