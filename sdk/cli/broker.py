"""`edgefleet broker`: run an embedded MQTT broker in the foreground until Ctrl-C."""

from __future__ import annotations

import signal
import threading

import typer

from edgefleet.sdk.cli.errors import err_console


def register(app: typer.Typer) -> None:
    """Attach the `broker` command."""

    @app.command("broker")
    def broker(
        host: str = typer.Option("127.0.0.1", help="Address to listen on."),
        port: int = typer.Option(1883, help="Port to listen on (0 picks a free one)."),
        backend: str = typer.Option(
            "auto", help="auto (mosquitto if on PATH, else amqtt), mosquitto or amqtt."
        ),
    ) -> None:
        """Run an embedded MQTT broker for trying edgefleet out (Mosquitto if installed, else amqtt)."""
        from rich.console import Console

        from edgefleet.sdk.fleet.broker import BrokerError, EmbeddedBroker

        err = err_console()
        if backend not in ("auto", "mosquitto", "amqtt"):
            err.print(f"[red]unknown --backend {backend!r}[/]: use auto, mosquitto or amqtt")
            raise typer.Exit(2)
        server = EmbeddedBroker(host=host, port=port, backend=backend)  # type: ignore[arg-type]
        try:
            server.start()
        except BrokerError as exc:
            err.print(f"[red]broker failed:[/] {exc}")
            raise typer.Exit(1) from exc
        Console(soft_wrap=True).print(
            f"[green]{server.chosen}[/] listening on [bold]{server.url}[/] — Ctrl-C stops it"
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            stop.wait()
        except KeyboardInterrupt:
            pass
        finally:
            server.stop()
