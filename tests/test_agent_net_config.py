"""Agent configuration and exit codes: every field validated by name, every exit code documented."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgefleet.agent.config import load_config
from edgefleet.agent.core.errors import ConfigError
from edgefleet.agent.exitcodes import HELP, ExitCode, describe


@pytest.fixture
def key(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.pub"
    path.write_text("x")
    return path


def test_file_and_flag_overrides(tmp_path: Path, key: Path) -> None:
    cfg_file = tmp_path / "agent.toml"
    cfg_file.write_text(
        '[agent]\ndevice_id = "pi-1"\nprofile = "rpi4b"\ntrusted_keys = ["fleet.pub"]\n'
        'broker = "mqtts://broker.example:8884"\ntelemetry_interval_s = 5\ntags = ["lab"]\nstate_dir = "state"\n'
    )
    cfg = load_config(str(cfg_file), {"telemetry_interval_s": "2.5", "mqtt_version": None})
    assert cfg.device_id == "pi-1" and cfg.trusted_keys == (str(key),)
    assert cfg.telemetry_interval_s == 2.5 and cfg.tags == ("lab",)
    assert cfg.use_tls and cfg.broker_host == "broker.example" and cfg.broker_port == 8884
    assert cfg.state_dir == str(tmp_path / "state")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"device_id": "pi/1"}, "device_id"),
        ({"broker": "http://x"}, "broker"),
        ({"broker": "mqtt://x:99999"}, "broker"),
        ({"mqtt_version": "4"}, "mqtt_version"),
        ({"telemetry_interval_s": "fast"}, "telemetry_interval_s"),
        ({"telemetry_interval_s": 0}, "telemetry_interval_s"),
        ({"http_port": 1.5}, "http_port"),
        ({"http_enabled": "maybe"}, "http_enabled"),
        ({"tls_cert": "/nonexistent.pem", "tls_key": "/nonexistent.key"}, "tls_cert"),
        ({"tls_ca": "/nonexistent.pem"}, "tls_ca"),
        ({"password": "p"}, "username"),
        ({"colour": "blue"}, "colour"),
        ({"reconnect_min_s": 10, "reconnect_max_s": 1}, "reconnect_max_s"),
    ],
)
def test_invalid_fields_are_named(key: Path, overrides: dict, field: str) -> None:
    base = {"device_id": "pi-1", "profile": "rpi4b", "trusted_keys": [str(key)]}
    with pytest.raises(ConfigError) as err:
        load_config(None, {**base, **overrides})
    assert field in err.value.reason


def test_required_fields_name_the_flag(key: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, {"profile": "rpi4b", "trusted_keys": [str(key)]})
    assert "--device-id" in err.value.reason


def test_bad_toml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text("device_id = \n")
    with pytest.raises(ConfigError) as err:
        load_config(str(bad))
    assert "TOML" in err.value.reason
    with pytest.raises(ConfigError):
        load_config(str(tmp_path / "missing.toml"))


def test_every_exit_code_has_help_text() -> None:
    assert set(HELP) == set(ExitCode)
    assert all(text.strip() for text in HELP.values())
    assert len({int(c) for c in ExitCode}) == len(ExitCode)
    for code in ExitCode:
        assert code.name.lower() in describe()


def test_agent_help_lists_exit_codes() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "edgefleet.agent.cli", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0
    for code in ExitCode:
        assert code.name.lower() in out.stdout


def test_agent_exit_codes_for_bad_config_and_missing_key(tmp_path: Path, key: Path) -> None:
    run = [sys.executable, "-m", "edgefleet.agent.cli"]
    bad = subprocess.run(
        [*run, "--device-id", "pi/1", "--profile", "x86-64", "--trusted-key", str(key)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == ExitCode.CONFIG and "device_id" in bad.stderr and "Traceback" not in bad.stderr
    usage = subprocess.run([*run, "--no-such-flag"], capture_output=True, text=True, timeout=60, check=False)
    assert usage.returncode == ExitCode.USAGE
    nokey = subprocess.run(
        [
            *run,
            "--device-id",
            "pi-1",
            "--profile",
            "x86-64",
            "--trusted-key",
            str(tmp_path / "none.pub"),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert nokey.returncode == ExitCode.TRUST, nokey.stderr


def test_docs_list_every_config_field_and_exit_code() -> None:
    from edgefleet.agent.config import config_fields

    text = (Path(__file__).resolve().parents[1] / "docs" / "agent.md").read_text()
    for name, _, _ in config_fields():
        assert f"`{name}`" in text, name
    for code in ExitCode:
        assert f"| {int(code)} | {code.name.lower()} |" in text, code


def test_agent_exit_codes_for_state_dir_profile_and_broker(tmp_path: Path) -> None:
    from edgefleet.sdk.trust.keys import init_keys
    from tests.conftest import free_port

    pub = str(init_keys(tmp_path / "keys").public_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    base = [
        sys.executable,
        "-m",
        "edgefleet.agent.cli",
        "--device-id",
        "pi-1",
        "--trusted-key",
        pub,
        "--no-http",
    ]
    cases = [
        (["--profile", "x86-64", "--state-dir", str(blocker / "state")], ExitCode.STATE_DIR, "state"),
        (
            ["--profile", "no-such-board", "--state-dir", str(tmp_path / "s1")],
            ExitCode.PROFILE,
            "no-such-board",
        ),
        (
            [
                "--profile",
                "x86-64",
                "--state-dir",
                str(tmp_path / "s2"),
                "--broker",
                f"mqtt://127.0.0.1:{free_port()}",
                "--connect-timeout",
                "0.5",
            ],
            ExitCode.BROKER_UNREACHABLE,
            "no connection",
        ),
    ]
    for extra, code, text in cases:
        out = subprocess.run([*base, *extra], capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode == code, (extra, out.stderr[-2000:])
        assert text in out.stderr and "Traceback" not in out.stderr
