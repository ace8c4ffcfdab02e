"""The `edgefleet` command line: one typer app; each command group lives in its own `cli_*` module."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="edgefleet",
    help="Take a trained model to a fleet of Raspberry Pi and Jetson devices and keep it healthy there.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines `register(app)`; keeping them separate keeps `edgefleet --help` fast, because
# heavy libraries are imported inside the commands, never at module level.
COMMAND_MODULES: list[str] = [
    "broker",
    "serve",
    "keys",
    "bundle",
    "build",
    "profiles",
    "fleet",
    "credentials",
    "demo",
    "federate",
    "finetune",
]


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print the edgefleet version and exit."),
) -> None:
    """Take a trained model to a fleet of Raspberry Pi and Jetson devices and keep it healthy there."""
    if version:
        from edgefleet.agent import __version__

        typer.echo(__version__)
        raise typer.Exit(0)


def _register_all() -> None:
    """Attach every command group to the app."""
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"edgefleet.sdk.cli.{name}")
        module.register(app)


_register_all()


def main() -> None:
    """Entry point of the `edgefleet` console script."""
    app()
