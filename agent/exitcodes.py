"""Exit codes of `edgefleet-agent`, each with the help text `--help` and the docs print."""

from __future__ import annotations

import enum
from typing import Dict


class ExitCode(enum.IntEnum):
    """Why the agent process ended; systemd restarts it on every code except CONFIG and USAGE."""

    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    TRUST = 4
    STATE_DIR = 5
    BROKER_AUTH = 6
    BROKER_UNREACHABLE = 7
    PROFILE = 8
    BROKER_PROTOCOL = 9
    INTERRUPTED = 130


HELP: Dict[ExitCode, str] = {
    ExitCode.OK: "stopped cleanly (SIGTERM, SIGINT or the `stop` API).",
    ExitCode.INTERNAL: "an unexpected error; the traceback is in the log: please report it.",
    ExitCode.USAGE: "the command line is wrong (unknown flag, missing value); see --help.",
    ExitCode.CONFIG: "the config file or a flag has an invalid value; the message names the field.",
    ExitCode.TRUST: "no trusted key could be read (--trusted-key / trusted_keys): the agent refuses to run "
    "without one, because it could not verify any bundle.",
    ExitCode.STATE_DIR: "the state folder (--state-dir) cannot be created or written: fix its path or "
    "permissions.",
    ExitCode.BROKER_AUTH: "the broker refused the credentials or client certificate: fix username/password "
    "or TLS files.",
    ExitCode.BROKER_UNREACHABLE: "no broker of --broker could be reached within --connect-timeout (only when "
    "that is set; by default the agent retries forever with backoff).",
    ExitCode.PROFILE: "the device profile is unknown or none of its runtimes is installed: install the "
    "runtime (pip install 'edgefleet[agent]') or pick another --profile.",
    ExitCode.BROKER_PROTOCOL: "the broker refused the MQTT protocol version (--mqtt-version; the default "
    "auto tries 5, then 3.1.1): use a broker that speaks MQTT 3.1.1 or 5, or another --mqtt-version.",
    ExitCode.INTERRUPTED: "interrupted by Ctrl-C before a clean start.",
}


def describe() -> str:
    """One line per exit code, for `--help` and the docs."""
    return "\n".join(f"  {int(code):>3}  {code.name.lower():<19} {HELP[code]}" for code in ExitCode)
