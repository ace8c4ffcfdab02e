"""`edgefleet credentials init|add-device|revoke|list|mosquitto-conf`: broker identities, CRL and ACL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from edgefleet.sdk.cli.errors import fail as _fail
from edgefleet.sdk.cli.output import print_table

_DIR = typer.Option(
    None,
    "--dir",
    envvar="EDGEFLEET_CREDENTIALS",
    help="Credentials folder made by `credentials init` (default ~/.edgefleet/credentials).",
)
_JSON = typer.Option(False, "--json", help="Print JSON.")


def _dump(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))


def _reload_hint(auth: str) -> str:
    if auth == "cert":
        return (
            "Copy broker/crl.pem to the broker if it runs elsewhere, then reload it: kill -HUP $(pidof mosquitto) "
            "or systemctl reload mosquitto. New connections are then refused; a revoked device that is "
            "connected right now stays connected until it drops: restart the broker to cut it at once."
        )
    return (
        "Copy broker/passwd to the broker if it runs elsewhere, then reload it: kill -HUP $(pidof mosquitto) "
        "or systemctl reload mosquitto; the reload also disconnects revoked devices that are connected."
    )


def register(app: typer.Typer) -> None:
    """Attach the `credentials` command group."""
    creds_app = typer.Typer(
        help="Per-device broker identities: a CA, client certificates or passwords, a CRL and the ACL.",
        no_args_is_help=True,
    )
    app.add_typer(creds_app, name="credentials")

    @creds_app.command("init")
    def init(
        fleet: str = typer.Option("default", "--fleet", help="Fleet name (the ACL's topic prefix)."),
        out: Optional[Path] = typer.Option(
            None, "--out", help="Folder to create (default ~/.edgefleet/credentials)."
        ),
        auth: str = typer.Option(
            "cert",
            "--auth",
            help="cert: client certificates (CN = device id); password: usernames/passwords.",
        ),
        broker_host: list[str] = typer.Option(
            [],
            "--broker-host",
            help="DNS name or IP devices reach the broker at (server certificate SAN); repeatable. "
            "localhost, 127.0.0.1 and ::1 are always included.",
        ),
        host_name: str = typer.Option(
            "edgefleet-host", "--host-name", help="CN / username of the host identity."
        ),
        days: int = typer.Option(1825, "--days", help="Validity of device, host and server certificates."),
        ca_days: int = typer.Option(3650, "--ca-days", help="Validity of the CA (and of the CRL)."),
        force: bool = typer.Option(
            False, "--force", help="Replace existing credentials (every device issued so far is locked out)."
        ),
        as_json: bool = _JSON,
    ) -> None:
        """Create the CA, the broker's certificate, the host identity, an empty CRL and the ACL."""
        from edgefleet.sdk.trust.credentials import Credentials, CredentialsError, default_dir

        try:
            creds = Credentials.init(
                out or default_dir(),
                fleet,
                auth=auth,
                host_name=host_name,
                broker_hosts=broker_host,
                ca_days=ca_days,
                days=days,
                force=force,
            )
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        info = {
            "dir": str(creds.root),
            "fleet": creds.fleet,
            "auth": creds.auth,
            "broker_hosts": creds.broker_hosts,
            "host": creds.host().as_dict(),
        }
        if as_json:
            _dump(info)
            return
        host = creds.host()
        typer.echo(f"credentials for fleet {creds.fleet} ({creds.auth}) in {creds.root}")
        typer.echo(
            f"  CA:            {creds.layout.ca_cert} (key {creds.layout.ca_key}, 0600: keep it offline)"
        )
        typer.echo(f"  broker:        {creds.layout.server_cert} for {', '.join(creds.broker_hosts)}")
        typer.echo(
            f"  host identity: {host.name} in {host.folder} (connects to the host listener, port 8884)"
        )
        typer.echo("Next: edgefleet credentials add-device ID ... and edgefleet credentials mosquitto-conf")

    @creds_app.command("add-device")
    def add_device(
        device_ids: list[str] = typer.Argument(..., metavar="ID...", help="Device ids (CN / username)."),
        directory: Optional[Path] = _DIR,
        as_json: bool = _JSON,
    ) -> None:
        """Issue credentials for devices; each gets a folder to copy onto it (with an agent.toml)."""
        from edgefleet.sdk.trust.credentials import Credentials, CredentialsError, default_dir

        try:
            creds = Credentials.open(directory or default_dir())
            added = creds.add_devices(device_ids)
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        if as_json:
            _dump([i.as_dict() for i in added])
            return
        for ident in added:
            typer.echo(f"{ident.name}: {ident.folder}")
        typer.echo("Copy each folder onto its device; run edgefleet-agent --config agent.toml there.")
        if creds.auth == "password":
            typer.echo(_reload_hint(creds.auth))

    @creds_app.command("revoke")
    def revoke(
        device_ids: list[str] = typer.Argument(..., metavar="ID...", help="Device ids to lock out."),
        directory: Optional[Path] = _DIR,
        as_json: bool = _JSON,
    ) -> None:
        """Revoke devices: re-issue the CRL (certificates) or drop them from the password file."""
        from edgefleet.sdk.trust.credentials import Credentials, CredentialsError, default_dir

        try:
            creds = Credentials.open(directory or default_dir())
            creds.revoke(device_ids)
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        changed = creds.layout.crl if creds.auth == "cert" else creds.layout.passwd
        if as_json:
            _dump({"revoked": device_ids, "updated": str(changed)})
            return
        typer.echo(f"revoked {', '.join(device_ids)}; updated {changed}")
        typer.echo(_reload_hint(creds.auth))

    @creds_app.command("list")
    def list_devices(directory: Optional[Path] = _DIR, as_json: bool = _JSON) -> None:
        """Devices with credentials: status, serial, dates."""
        from edgefleet.sdk.trust.credentials import Credentials, CredentialsError, default_dir

        try:
            creds = Credentials.open(directory or default_dir())
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        rows = [{k: v for k, v in d.items() if k != "password_hash"} for d in creds.devices()]
        if as_json:
            _dump({"fleet": creds.fleet, "auth": creds.auth, "host": creds.host_name, "devices": rows})
            return
        from rich.table import Table

        table = Table(title=f"fleet {creds.fleet} ({creds.auth}), host identity {creds.host_name}")
        for column in ("device", "status", "issued", "expires", "revoked"):
            table.add_column(column)
        for row in rows:
            table.add_row(
                row["id"], row["status"], row["issued"], row.get("not_after", "-"), row.get("revoked", "-")
            )
        print_table(table)

    @creds_app.command("mosquitto-conf")
    def mosquitto_conf(
        directory: Optional[Path] = _DIR,
        port: int = typer.Option(8883, "--port", help="Devices' TLS listener port."),
        host_port: Optional[int] = typer.Option(
            None, "--host-port", help="The host identity's TLS listener port (default: --port + 1)."
        ),
        bind: Optional[str] = typer.Option(None, "--bind", help="Address to listen on (default: all)."),
        base: Optional[str] = typer.Option(
            None, "--base", help="Where the credentials folder lies on the broker machine, if elsewhere."
        ),
        write: Optional[Path] = typer.Option(
            None, "--write", help="Write the config to this file instead of printing it."
        ),
    ) -> None:
        """Print (or write) a Mosquitto 2.0 config: device and host TLS listeners, CA, CRL or passwords, ACL."""
        from edgefleet.sdk.trust.credentials import Credentials, CredentialsError, default_dir

        try:
            creds = Credentials.open(directory or default_dir())
            if creds.upgrade_host_listener():
                typer.echo(
                    f"note: {creds.root} predates the host listener; wrote "
                    + (
                        "a host CA and a new host certificate (restart host processes to use it)"
                        if creds.auth == "cert"
                        else "broker/host.passwd"
                    ),
                    err=True,
                )
            text = creds.mosquitto_conf(port=port, bind=bind, base=base, host_port=host_port)
        except CredentialsError as exc:
            raise _fail(str(exc)) from None
        if write is None:
            typer.echo(text, nl=False)
            return
        try:
            write.parent.mkdir(parents=True, exist_ok=True)
            write.write_text(text)
        except OSError as exc:
            raise _fail(f"cannot write {write}: {exc}") from None
        typer.echo(
            f"wrote {write}: start the broker with mosquitto -c {write}; devices connect to port {port}, "
            f"the host identity to port {host_port or port + 1}"
        )
