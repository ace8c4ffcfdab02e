"""`edgefleet serve`: the control plane's window: ingest (with --broker), REST API, metrics and dashboard."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgefleet.sdk.cli.env import BROKER_PASSWORD, read_old_names
from edgefleet.sdk.cli.errors import err_console


def _home() -> Path:
    """edgefleet's folder: `EDGEFLEET_HOME`, default ~/.edgefleet."""
    from edgefleet.agent.core.paths import edgefleet_home

    return edgefleet_home()


def _attach_fleet(
    options: Any,
    store: Any,
    fleet: str,
    trusted_keys: list[Path],
    worker: Optional[str] = None,
    share_group: Optional[str] = None,
    partition: Optional[tuple[int, int]] = None,
    lease_s: Optional[float] = None,
) -> Any:
    """Connect the fleet control plane to the broker and start ingesting state, events and telemetry.

    Ingest also resumes any rollout whose host process died, as `edgefleet deploy` would, and keeps
    taking over the rollouts of workers that stop renewing their lease.
    """
    from edgefleet.sdk.fleet.client import Fleet

    extra: dict[str, Any] = {} if lease_s is None else {"lease_s": lease_s}
    client = Fleet(
        broker=options, store=store, fleet=fleet, trusted_keys=trusted_keys, worker=worker, **extra
    )
    if worker is None:
        client.start_ingest()
    else:
        # A worker's ingest session lease is shorter than its rollout lease: telemetry waits less.
        session_lease = None if lease_s is None else max(3.0, lease_s / 2)
        client.start_ingest(share_group, partition=partition, ingest_lease_s=session_lease)
    return client


def register(app: typer.Typer) -> None:
    """Attach the `serve` command."""

    @app.command("serve")
    def serve(
        host: str = typer.Option(
            "127.0.0.1", help="Address to listen on; beyond loopback a token is required."
        ),
        port: int = typer.Option(8080, help="Port to listen on."),
        db: Optional[str] = typer.Option(
            None, envvar="EDGEFLEET_DB", help="Store URL (sqlite:///PATH or postgresql://...)."
        ),
        broker: Optional[str] = typer.Option(
            None,
            envvar="EDGEFLEET_BROKER",
            help="mqtt://HOST:PORT: ingest telemetry and enable deploy/abort. Without it the API is read-only.",
        ),
        fleet: str = typer.Option("default", help="Fleet name (topic prefix edgefleet/v1/NAME)."),
        username: Optional[str] = typer.Option(None, help="Broker username."),
        password: Optional[str] = typer.Option(
            None,
            envvar=BROKER_PASSWORD,
            callback=read_old_names(BROKER_PASSWORD),
            help="Broker password (prefer the env variable).",
        ),
        tls_ca: Optional[str] = typer.Option(None, help="CA file to verify the broker's TLS certificate."),
        tls_cert: Optional[str] = typer.Option(None, help="Client certificate for TLS (with --tls-key)."),
        tls_key: Optional[str] = typer.Option(None, help="Client key for TLS (with --tls-cert)."),
        token: Optional[str] = typer.Option(
            None, envvar="EDGEFLEET_TOKEN", help="Bearer token the API requires (required beyond loopback)."
        ),
        trusted_key: list[Path] = typer.Option(
            [], help="Public key(s) uploads must be signed with (default ~/.edgefleet/keys/fleet.pub)."
        ),
        bundle_dir: Optional[Path] = typer.Option(
            None, help="Where uploaded bundles are kept (default ~/.edgefleet/bundles)."
        ),
        max_upload_mb: int = typer.Option(512, min=1, help="Largest bundle upload accepted, in MiB."),
        poll: float = typer.Option(
            1.0, min=0.05, help="Seconds between checks of the store for live updates."
        ),
        log_level: str = typer.Option(
            "info", help="uvicorn log level: critical, error, warning, info, debug."
        ),
        worker: Optional[str] = typer.Option(
            None,
            envvar="EDGEFLEET_WORKER",
            help="Name of this process among several `serve` on one store (with --share-group or "
            "--partition): they split ingest, and each rollout is driven by one of them at a time.",
        ),
        share_group: Optional[str] = typer.Option(
            None,
            help="With --worker: share ingest through the MQTT shared subscription $share/GROUP/... "
            "(default 'ingest'; brokers with MQTT 5 shared subscriptions, e.g. Mosquitto).",
        ),
        partition: Optional[str] = typer.Option(
            None,
            help="With --worker, instead of --share-group: store the devices whose id hashes to K of N "
            "(K/N, 0-based), for brokers without shared subscriptions (NATS); the worker's name must be K.",
        ),
        lease_s: Optional[float] = typer.Option(
            None,
            min=3.0,
            help="Seconds a worker's rollout lease lasts without renewal; a dead worker's rollouts "
            "and ingest share are taken over after about this long (default 10).",
        ),
    ) -> None:
        """Serve the REST API (/docs), Prometheus /metrics and the live dashboard (/) over the fleet's store."""
        from rich.console import Console

        from edgefleet.sdk.server.auth import check_bind, resolve_token
        from edgefleet.sdk.server.errors import ServerConfigError
        from edgefleet.sdk.store import Store, StoreError

        err = err_console()
        the_token = resolve_token(token)
        try:
            check_bind(host, the_token)
        except ServerConfigError as exc:
            err.print(f"[red]serve refused:[/] {exc}")
            raise typer.Exit(2) from exc
        if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
            err.print(
                f"[red]unknown --log-level {log_level!r}[/]: use critical, error, warning, info or debug"
            )
            raise typer.Exit(2)
        keys = list(trusted_key)
        default_key = _home() / "keys" / "fleet.pub"
        if not keys and default_key.is_file():
            keys = [default_key]
        missing = [k for k in keys if not k.is_file()]
        if missing:
            err.print(
                f"[red]no such key file:[/] {missing[0]}; pass the fleet's .pub file (edgefleet keys init)"
            )
            raise typer.Exit(2)
        if keys:
            from edgefleet.agent.core.errors import VerifyError
            from edgefleet.agent.core.trust import TrustStore

            try:
                TrustStore.from_public_keys([str(k) for k in keys])
            except VerifyError as exc:
                err.print(f"[red]--trusted-key:[/] {exc.reason}")
                raise typer.Exit(2) from exc
        split: Optional[tuple[int, int]] = None
        group: Optional[str] = None
        if worker is not None:
            from edgefleet.agent.core.protocol import valid_name
            from edgefleet.sdk.fleet.ingest_sessions import parse_partition

            if not valid_name(worker):
                err.print(f"[red]--worker {worker!r}:[/] use 1-128 letters, digits, '.', '_' or '-'")
                raise typer.Exit(2)
            if partition is not None and share_group is not None:
                err.print("[red]--partition and --share-group exclude each other:[/] pass one of them")
                raise typer.Exit(2)
            if partition is not None:
                try:
                    split = parse_partition(partition)
                except ValueError as exc:
                    err.print(f"[red]--partition:[/] {exc}")
                    raise typer.Exit(2) from exc
                if worker != str(split[0]):
                    err.print(
                        f"[red]--worker {worker} with --partition {partition}:[/] a partition worker is "
                        f"named by its partition; pass --worker {split[0]}"
                    )
                    raise typer.Exit(2)
            else:
                group = share_group or "ingest"
                if not valid_name(group):
                    err.print(f"[red]--share-group {group!r}:[/] use letters, digits, '.', '_' or '-'")
                    raise typer.Exit(2)
        elif share_group is not None or partition is not None:
            err.print("[red]--share-group and --partition name a worker's share:[/] pass --worker NAME too")
            raise typer.Exit(2)
        try:
            store = Store(db)
        except StoreError as exc:
            err.print(f"[red]store:[/] {exc}")
            raise typer.Exit(1) from exc

        import uvicorn

        from edgefleet.sdk.server.app import create_app

        control = None
        if broker:
            from edgefleet.sdk.fleet.errors import FleetError
            from edgefleet.sdk.fleet.mqtt_url import MqttOptions

            try:
                options = MqttOptions(
                    broker,
                    username=username,
                    password=password,
                    tls_ca=tls_ca,
                    tls_cert=tls_cert,
                    tls_key=tls_key,
                )
                control = _attach_fleet(options, store, fleet, keys, worker, group, split, lease_s)
            except (FleetError, OSError) as exc:
                err.print(
                    f"[red]cannot use the broker {broker}:[/] {exc}. Check that it runs, or drop --broker"
                )
                store.close()
                raise typer.Exit(1) from exc
        app = create_app(
            store,
            control,
            the_token,
            fleet_name=fleet,
            bundle_dir=bundle_dir or _home() / "bundles",
            trusted_keys=keys,
            poll_s=poll,
            max_upload_bytes=max_upload_mb * 1024 * 1024,
        )
        shown = f"[{host}]" if ":" in host else host
        Console(soft_wrap=True).print(
            f"edgefleet serve: fleet [bold]{fleet}[/], store {store.engine.url.render_as_string(hide_password=True)}, "
            f"{'ingesting from ' + broker if broker else 'read-only (no --broker)'}"
            + (
                f", worker [bold]{worker}[/] ({f'partition {partition}' if split else f'group {group}'})"
                if worker
                else ""
            )
            + "\n"
            f"dashboard [bold]http://{shown}:{port}/[/]  API docs http://{shown}:{port}/docs"
            + ("  (bearer token required)" if the_token else "")
        )
        try:
            uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
        finally:
            if control is not None:
                close = getattr(control, "close", None)
                if callable(close):
                    close()
            store.close()
