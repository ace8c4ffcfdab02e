"""`edgefleet keys init|rotate|show|push-rotation`: the fleet's Ed25519 signing keys and root rotations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer

from edgefleet.sdk.cli.env import BROKER_PASSWORD, read_old_names
from edgefleet.sdk.cli.errors import fail as _fail


def _passphrase(env_var: Optional[str], prompt: bool, confirm: bool) -> Optional[str]:
    """Resolve the passphrase from an environment variable or an interactive prompt."""
    if env_var:
        value = os.environ.get(env_var)
        if not value:
            raise _fail(
                f"--passphrase-env {env_var}: that environment variable is empty or unset; export it first"
            )
        return value
    if prompt:
        return str(typer.prompt("Passphrase", hide_input=True, confirmation_prompt=confirm))
    return None


def register(app: typer.Typer) -> None:
    """Attach the `keys` command group."""
    keys_app = typer.Typer(
        help="The fleet's Ed25519 signing keys: create, rotate, show.", no_args_is_help=True
    )
    app.add_typer(keys_app, name="keys")

    @keys_app.command("init")
    def init(
        directory: Optional[Path] = typer.Option(
            None, "--dir", help="Key folder (default ~/.edgefleet/keys)."
        ),
        passphrase_env: Optional[str] = typer.Option(
            None, "--passphrase-env", help="Encrypt the private key with the passphrase in this env variable."
        ),
        passphrase: bool = typer.Option(
            False, "--passphrase", help="Prompt for a passphrase to encrypt the key."
        ),
        force: bool = typer.Option(
            False, "--force", help="Overwrite an existing key pair (devices trusting it break)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Create the fleet's signing key pair; prints the public key and key id to give the agents."""
        from edgefleet.sdk.trust.keys import KeysError, init_keys

        secret = _passphrase(passphrase_env, passphrase, confirm=True)
        try:
            pair = init_keys(directory, passphrase=secret, force=force)
        except KeysError as exc:
            raise _fail(exc.reason) from None
        info = {
            "keyid": pair.keyid,
            "private_key": str(pair.private_path),
            "public_key": str(pair.public_path),
            "public_pem": pair.public_pem,
            "encrypted": pair.encrypted,
        }
        if as_json:
            typer.echo(json.dumps(info, indent=2))
            return
        typer.echo(
            f"private key: {pair.private_path} (0600{', passphrase-encrypted' if pair.encrypted else ''})"
        )
        typer.echo(f"public key:  {pair.public_path}")
        typer.echo(f"key id:      {pair.keyid}")
        typer.echo(pair.public_pem.rstrip())
        typer.echo(f"Give the agents the public key: edgefleet-agent --trusted-key {pair.public_path}")
        typer.echo(
            f"online command key: {pair.private_path.parent / 'online.key'} (0600; signs every command, "
            "delegated by the fleet key in online.json; agents refuse unsigned commands: keep it on the host)"
        )

    @keys_app.command("online")
    def online(
        directory: Optional[Path] = typer.Option(
            None, "--dir", help="Key folder (default ~/.edgefleet/keys)."
        ),
        days: int = typer.Option(365, "--days", help="How long the delegation is valid."),
        passphrase_env: Optional[str] = typer.Option(
            None, "--passphrase-env", help="The fleet key's passphrase is in this env variable."
        ),
    ) -> None:
        """(Re-)create the online command key, delegated by the offline fleet key (fleets made before it)."""
        from edgefleet.sdk.trust.command_signing import CommandKeyError, init_online_key
        from edgefleet.sdk.trust.keys import PRIVATE_KEY_FILE, KeysError, default_key_dir, load_private_key

        folder = directory or default_key_dir()
        secret = _passphrase(passphrase_env, False, confirm=False)
        try:
            path = init_online_key(
                folder, load_private_key(folder / PRIVATE_KEY_FILE, secret), days=days, force=True
            )
        except (KeysError, CommandKeyError) as exc:
            raise _fail(str(exc)) from None
        typer.echo(f"online command key: {path} (delegation {folder / 'online.json'}, {days} days)")

    @keys_app.command("show")
    def show(
        directory: Optional[Path] = typer.Option(
            None, "--dir", help="Key folder (default ~/.edgefleet/keys)."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show the host's current fleet root: version, thresholds, trusted key ids."""
        from edgefleet.sdk.trust.keys import KeysError, load_host_root

        try:
            root = load_host_root(directory)
        except KeysError as exc:
            raise _fail(exc.reason) from None
        if as_json:
            typer.echo(json.dumps(root, indent=2, sort_keys=True))
            return
        typer.echo(
            f"root version {root['version']}, rotation threshold {root['threshold']}, "
            f"bundle threshold {root.get('bundle_threshold', 1)}, expires {root.get('expires') or 'never'}"
        )
        for kid in sorted(root["keys"]):
            typer.echo(f"  trusted key {kid}")

    @keys_app.command("rotate")
    def rotate(
        new_keys: list[Path] = typer.Option(
            ..., "--key", help="Public key (.pub) of the new root; repeat for each."
        ),
        sign_with: list[Path] = typer.Option(
            ..., "--sign-with", help="Private key that signs the rotation; repeat (old keys and new keys)."
        ),
        threshold: int = typer.Option(1, help="Signatures the NEXT rotation will need."),
        bundle_threshold: int = typer.Option(1, help="Signatures each bundle will need."),
        expires_days: int = typer.Option(365, help="Days until the new root expires."),
        out: Path = typer.Option(..., "-o", "--out", help="Where to write the rotation statement (JSON)."),
        directory: Optional[Path] = typer.Option(None, "--dir", help="Key folder holding root.json."),
        passphrase_env: Optional[str] = typer.Option(
            None, "--passphrase-env", help="Passphrase of the signing keys, from this env variable."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Make root version n+1 with new keys, signed by enough current (and new) keys; devices apply it."""
        from datetime import datetime, timedelta, timezone

        from edgefleet.agent.core.trust import key_id
        from edgefleet.sdk.trust.keys import (
            KeysError,
            load_host_root,
            load_private_key,
            make_rotation,
            save_rotation,
        )

        secret = _passphrase(passphrase_env, False, confirm=False)
        try:
            current = load_host_root(directory)
            signers = [load_private_key(p, secret) for p in sign_with]
            statement = make_rotation(
                current,
                [str(p) for p in new_keys],
                signers,
                threshold=threshold,
                bundle_threshold=bundle_threshold,
                expires=datetime.now(timezone.utc) + timedelta(days=expires_days),
            )
            save_rotation(statement, out, directory)
        except KeysError as exc:
            raise _fail(f"{exc.code}: {exc.reason}") from None
        root = statement["root"]
        # The online command key stays; the new root's keys delegate it again (devices check that).
        from edgefleet.sdk.trust.command_signing import redelegate
        from edgefleet.sdk.trust.keys import default_key_dir, public_raw

        new_signers = [k for k in signers if key_id(public_raw(k)) in root["keys"]]
        redelegated = bool(new_signers) and redelegate(directory or default_key_dir(), new_signers)
        if as_json:
            typer.echo(json.dumps({"out": str(out), "root": root}, indent=2, sort_keys=True))
            return
        typer.echo(f"root version {root['version']} with {len(root['keys'])} key(s) written to {out}")
        typer.echo("Send it to the devices; they apply it only if enough current keys signed it.")
        if redelegated:
            typer.echo("The online command key is delegated again by the new root's keys (online.json).")

    @keys_app.command("push-rotation")
    def push_rotation_cmd(
        statement: Path = typer.Argument(
            ..., help="Rotation statement written by `edgefleet keys rotate -o`."
        ),
        to: str = typer.Option(
            "all", "--to", "--target", help="Devices: a device id, tag:NAME, profile:NAME or all."
        ),
        timeout: float = typer.Option(30.0, "--timeout", min=0.1, help="Seconds to wait for the answers."),
        broker: Optional[str] = typer.Option(
            None, "--broker", envvar="EDGEFLEET_BROKER", help="mqtt://HOST:PORT or mqtts://HOST:PORT."
        ),
        fleet: str = typer.Option("default", "--fleet", help="Fleet name (topic prefix edgefleet/v1/NAME)."),
        username: Optional[str] = typer.Option(None, "--username", help="Broker username."),
        password: Optional[str] = typer.Option(
            None,
            "--password",
            envvar=BROKER_PASSWORD,
            callback=read_old_names(BROKER_PASSWORD),
            help="Broker password.",
        ),
        tls_ca: Optional[Path] = typer.Option(None, "--tls-ca", help="CA certificate (PEM) of the broker."),
        tls_cert: Optional[Path] = typer.Option(None, "--tls-cert", help="Client certificate (PEM)."),
        tls_key: Optional[Path] = typer.Option(None, "--tls-key", help="Client private key (PEM)."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Send a key rotation to the devices; each applies it only if enough current and new keys signed it.

        Exit 0 when every device applied it (or had it, or is offline with the command queued), 2 when a
        device refused it (the code says why), 1 when a device did not answer in time.
        """
        from dataclasses import asdict

        from edgefleet.sdk.fleet.errors import FleetError
        from edgefleet.sdk.fleet.mqtt_url import MqttOptions, default_broker_url
        from edgefleet.sdk.fleet.rotation import push_rotation
        from edgefleet.sdk.trust.keys import KeysError

        try:
            options = MqttOptions(
                broker or default_broker_url(),
                username=username,
                password=password,
                tls_ca=str(tls_ca) if tls_ca else None,
                tls_cert=str(tls_cert) if tls_cert else None,
                tls_key=str(tls_key) if tls_key else None,
            )
            outcomes = push_rotation(statement, to, broker=options, fleet=fleet, timeout_s=timeout)
        except KeysError as exc:
            raise _fail(f"{exc.code}: {exc.reason}") from None
        except FleetError as exc:
            raise _fail(str(exc)) from None
        rows = [asdict(o) for o in outcomes.values()]
        if as_json:
            typer.echo(json.dumps(rows, indent=2, sort_keys=True))
        else:
            for o in outcomes.values():
                detail = f" root v{o.root_version}" if o.root_version is not None else ""
                why = f" [{o.code}] {o.reason}" if o.code else ""
                typer.echo(f"{o.device_id}: {o.status}{detail}{why}")
        if any(o.status == "refused" for o in outcomes.values()):
            raise typer.Exit(2)
        if not all(o.ok for o in outcomes.values()):
            raise typer.Exit(1)
