"""`edgefleet-agent`: run the device agent from a TOML config and/or flags (argparse: no host deps)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from typing import Any, Dict, List, Optional

from edgefleet.agent import __version__
from edgefleet.agent.exitcodes import ExitCode, describe

log = logging.getLogger("edgefleet.agent")


class _Parser(argparse.ArgumentParser):
    """argparse that exits with ExitCode.USAGE (argparse's own 2) and a hint, never a traceback."""

    def error(self, message: str) -> Any:
        self.print_usage(sys.stderr)
        sys.stderr.write(f"edgefleet-agent: error: {message}\nrun `edgefleet-agent --help` for the options\n")
        raise SystemExit(int(ExitCode.USAGE))


def build_parser() -> argparse.ArgumentParser:
    """The command line; every flag maps to one config field of the same name."""
    parser = _Parser(
        prog="edgefleet-agent",
        description="Run the edgefleet device agent: receive signed models over MQTT, install them with an "
        "A/B switch and health check, serve inferences and report telemetry.",
        epilog="exit codes:\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config", metavar="FILE", help="TOML config file (flags override its values)")
    add("--device-id", dest="device_id", help="this device's id (letters, digits, '.', '_', '-')")
    add("--profile", help="device profile name (rpi4b, jetson-orin-nano, ...) or path of a TOML profile")
    add(
        "--emulate",
        metavar="PROFILE",
        help="behave like PROFILE on this machine: threads capped at its cores",
    )
    add(
        "--broker",
        action="append",
        metavar="URL",
        help="mqtt://host:port or mqtts://host:port (default mqtt://127.0.0.1:1883); repeat it or "
        "comma-separate several for failover: tried in order, back to the first when it answers again",
    )
    add("--fleet", help="fleet name: topic prefix edgefleet/v1/FLEET (default 'default')")
    add(
        "--state-dir",
        dest="state_dir",
        help="folder for slots, staging and state (default ~/.edgefleet/agent/ID)",
    )
    add(
        "--trusted-key",
        dest="trusted_keys",
        action="append",
        metavar="PUB",
        help="fleet public key (.pub) bundles must be signed with; repeat for several",
    )
    add("--tls-ca", dest="tls_ca", metavar="PEM", help="CA certificate that signed the broker's certificate")
    add("--tls-cert", dest="tls_cert", metavar="PEM", help="client certificate (with --tls-key)")
    add("--tls-key", dest="tls_key", metavar="PEM", help="client private key")
    add(
        "--tls-insecure",
        dest="tls_insecure",
        action="store_const",
        const=True,
        help="skip the hostname check",
    )
    add("--username", help="broker username")
    add("--password", help="broker password (visible in `ps`: prefer --password-file)")
    add("--password-file", dest="password_file", metavar="FILE", help="file holding the broker password")
    add(
        "--mqtt-version",
        dest="mqtt_version",
        choices=["auto", "5", "3.1.1"],
        help="MQTT protocol version (default auto: 5, then 3.1.1 when the broker refuses 5)",
    )
    add(
        "--tag",
        dest="tags",
        action="append",
        metavar="TAG",
        help="a tag deploy selectors can match; repeatable",
    )
    add(
        "--telemetry-interval",
        dest="telemetry_interval_s",
        type=float,
        metavar="S",
        help="seconds between telemetry",
    )
    add(
        "--eval-interval",
        dest="eval_interval_s",
        type=float,
        metavar="S",
        help="seconds between eval runs (0: off)",
    )
    add(
        "--shadow-share",
        dest="shadow_share",
        type=float,
        metavar="F",
        help="after a switch, share of requests also run on the replaced model to measure agreement (0: off)",
    )
    add(
        "--shadow-cpu",
        dest="shadow_cpu",
        type=float,
        metavar="F",
        help="CPU share the shadow worker may use (default 0.25)",
    )
    add(
        "--shadow-window",
        dest="shadow_s",
        type=float,
        metavar="S",
        help="seconds the shadow window lasts after a switch (0: off)",
    )
    add(
        "--http-port",
        dest="http_port",
        type=int,
        metavar="PORT",
        help="local HTTP API port on 127.0.0.1 (0: any)",
    )
    add(
        "--no-http",
        dest="http_enabled",
        action="store_const",
        const=False,
        help="turn the local HTTP API off",
    )
    add(
        "--mqtt-infer",
        dest="mqtt_infer",
        action="store_const",
        const=True,
        help="answer infer commands over MQTT",
    )
    add(
        "--connect-timeout",
        dest="connect_timeout_s",
        type=float,
        metavar="S",
        help="exit 7 if no broker accepted the connection within S seconds (default: retry forever)",
    )
    add(
        "--failback",
        dest="failback_s",
        type=float,
        metavar="S",
        help="on a later --broker, check this often whether the first is back (default 60; 0: never)",
    )
    add("--train-data", dest="train_data", metavar="DIR", help="local training data: .npz files with x and y")
    add(
        "--keep-feedback",
        dest="keep_feedback",
        type=int,
        metavar="N",
        help="keep N labelled requests on disk",
    )
    add("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    add("--version", action="version", version=f"edgefleet-agent {__version__}")
    return parser


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    values = vars(args).copy()
    values.pop("config", None)
    return {k: v for k, v in values.items() if v is not None}


def _fail(code: ExitCode, message: str) -> int:
    sys.stderr.write(f"edgefleet-agent: {message}\n")
    return int(code)


def run(argv: Optional[List[str]] = None) -> int:
    """Parse flags, start the agent, wait for a signal or a fatal error; return the exit code."""
    args = build_parser().parse_args(argv)
    from edgefleet.agent.config import load_config
    from edgefleet.agent.core.errors import ConfigError
    from edgefleet.agent.daemon import Agent, StartupError

    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        return _fail(ExitCode.CONFIG, f"invalid configuration: {exc.reason}")
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    agent = Agent(config)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        agent.start()
    except StartupError as exc:
        agent.stop()
        return _fail(exc.exit_code, exc.reason)
    code = ExitCode.OK
    while not stop.is_set():
        code = agent.wait(timeout=0.5)
        if code != ExitCode.OK:
            break
    agent.stop()
    if code != ExitCode.OK and agent.session is not None:
        return _fail(code, agent.session.fatal_reason)
    return int(code)


def main(argv: Optional[List[str]] = None) -> None:
    """Console-script entry point."""
    try:
        code = run(argv)
    except KeyboardInterrupt:
        code = int(ExitCode.INTERRUPTED)
    sys.exit(code)


if __name__ == "__main__":
    main()
