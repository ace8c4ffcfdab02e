"""One environment variable per setting across every command: the broker password is
EDGEFLEET_BROKER_PASSWORD for `serve`, the fleet commands and `keys push-rotation`; the old
EDGEFLEET_MQTT_PASSWORD is still read, with a warning that names the new one."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from typer.testing import CliRunner

from edgefleet.sdk.cli import app
from edgefleet.sdk.cli.env import BROKER_PASSWORD, RENAMED
from edgefleet.sdk.fleet.errors import FleetError

OLD = "EDGEFLEET_MQTT_PASSWORD"


def _password_seen(command: str, tmp_path: Path, env: dict[str, str]) -> tuple[Any, str]:
    """Run `command` up to the point it connects to the broker; the password it would use, and its output."""
    seen: dict[str, Any] = {}

    def attach(options: Any, *args: Any, **kwargs: Any) -> Any:
        seen["password"] = options.password
        raise FleetError("stopped by the test")

    def fleet(*args: Any, **kwargs: Any) -> Any:
        seen["password"] = kwargs.get("password")
        raise FleetError("stopped by the test")

    def push(statement: Any, to: Any, broker: Any, **kwargs: Any) -> dict[str, Any]:
        seen["password"] = broker.password
        return {}

    broker = ["--broker", "mqtt://127.0.0.1:1", "--username", "u"]
    args = {
        "serve": ["serve", "--db", f"sqlite:///{tmp_path / 's.db'}", *broker],
        "devices": ["devices", "--db", f"sqlite:///{tmp_path / 'd.db'}", *broker],
        "push-rotation": ["keys", "push-rotation", str(tmp_path / "rotation.json"), *broker],
    }[command]
    clean = {k: "" for k in (BROKER_PASSWORD, OLD)}
    with (
        mock.patch("edgefleet.sdk.cli.serve._attach_fleet", attach),
        mock.patch("edgefleet.sdk.fleet.client.Fleet", fleet),
        mock.patch("edgefleet.sdk.fleet.rotation.push_rotation", push),
    ):
        result = CliRunner().invoke(
            app, args, env={**clean, "EDGEFLEET_HOME": str(tmp_path / "home"), **env}, catch_exceptions=False
        )
    assert "password" in seen, result.output
    return seen["password"], result.output


COMMANDS = ["serve", "devices", "push-rotation"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_reads_the_broker_password_from_one_name(command: str, tmp_path: Path) -> None:
    # act
    password, output = _password_seen(command, tmp_path, {BROKER_PASSWORD: "s3cret"})
    # assert
    assert password == "s3cret"
    assert "deprecated" not in output


@pytest.mark.parametrize("command", COMMANDS)
def test_the_old_name_is_still_read_with_a_warning(command: str, tmp_path: Path) -> None:
    # act
    password, output = _password_seen(command, tmp_path, {OLD: "old-s3cret"})
    # assert
    assert password == "old-s3cret"
    assert f"{OLD} is deprecated: set {BROKER_PASSWORD} instead" in output


def test_the_new_name_wins_over_the_old(tmp_path: Path) -> None:
    # act
    password, output = _password_seen("serve", tmp_path, {OLD: "old", BROKER_PASSWORD: "new"})
    # assert
    assert password == "new" and f"{OLD} is deprecated and ignored" in output


def test_the_docs_list_every_variable_and_every_old_name() -> None:
    # prepare
    from edgefleet.sdk.cli import env

    text = (Path(__file__).resolve().parents[1] / "docs" / "environment.md").read_text()
    names = [getattr(env, n) for n in env.__all__ if n.isupper() and n != "RENAMED"]
    # assert
    assert all(f"`{name}`" in text for name in names)
    assert all(f"`{old}`" in text for old in RENAMED)
