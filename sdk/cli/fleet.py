"""`edgefleet devices | deploy | rollouts | rollout ID | telemetry DEVICE`: the fleet control plane's commands."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from edgefleet.agent.core.codes import ENDED_ROLLOUT, FAILED_DEVICE, DeviceStatus, RolloutStatus
from edgefleet.agent.core.parts import SystemMetrics
from edgefleet.agent.core.quality import METRIC_NAMES
from edgefleet.sdk.cli.env import BROKER_PASSWORD, read_old_names
from edgefleet.sdk.cli.errors import fail as _err
from edgefleet.sdk.cli.output import print_table
from edgefleet.sdk.fleet.strategy import MIN_REQUESTS, MIN_WINDOWS

if TYPE_CHECKING:
    from edgefleet.sdk.fleet.client import Fleet

EXIT_ABORTED = 3
EXIT_REFUSED = 2
EXIT_FAILED = 1
# Shown in red and counted as failed: the abort rules' failures and a rollback no device confirmed.
SHOWN_FAILED = FAILED_DEVICE | {DeviceStatus.ROLLBACK_FAILED}
# The series' quality columns: the vocabulary's three metrics, then accuracy on feedback labels.
QUALITY_KEYS = (*METRIC_NAMES, "live_accuracy")
QUALITY_HEADERS = (*METRIC_NAMES, "live accuracy")

_BROKER = typer.Option(
    None, "--broker", envvar="EDGEFLEET_BROKER", help="mqtt://HOST:PORT or mqtts://HOST:PORT."
)
_DB = typer.Option(None, "--db", envvar="EDGEFLEET_DB", help="Store URL: sqlite:///PATH or postgresql://...")
_FLEET = typer.Option("default", "--fleet", help="Fleet name (topic prefix edgefleet/v1/NAME).")
_USER = typer.Option(None, "--username", help="Broker username.")
_PASSWORD = typer.Option(
    None,
    "--password",
    envvar=BROKER_PASSWORD,
    callback=read_old_names(BROKER_PASSWORD),
    help="Broker password.",
)
_CA = typer.Option(None, "--tls-ca", help="CA certificate (PEM) that signed the broker's certificate.")
_CERT = typer.Option(None, "--tls-cert", help="Client certificate (PEM), with --tls-key.")
_KEY = typer.Option(None, "--tls-key", help="Client private key (PEM).")
_JSON = typer.Option(False, "--json", help="Print JSON.")


def _open(
    broker: Optional[str],
    db: Optional[str],
    fleet: str,
    username: Optional[str],
    password: Optional[str],
    tls_ca: Optional[Path],
    tls_cert: Optional[Path],
    tls_key: Optional[Path],
    trusted_keys: Optional[list[Path]] = None,
) -> Fleet:
    from edgefleet.sdk.fleet.client import Fleet
    from edgefleet.sdk.fleet.errors import FleetError
    from edgefleet.sdk.store import StoreError

    try:
        return Fleet(
            broker=broker,
            store=db,
            fleet=fleet,
            username=username,
            password=password,
            tls_ca=str(tls_ca) if tls_ca else None,
            tls_cert=str(tls_cert) if tls_cert else None,
            tls_key=str(tls_key) if tls_key else None,
            trusted_keys=trusted_keys or None,
        )
    except FleetError as exc:
        raise _err(str(exc), EXIT_REFUSED) from None
    except StoreError as exc:
        raise _err(str(exc), EXIT_FAILED) from None


def _dump(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True, default=str))


def _age(ts: Any) -> str:
    if not isinstance(ts, (int, float)):
        return "-"
    secs = max(0.0, time.time() - float(ts))
    return (
        f"{secs:.0f}s ago"
        if secs < 120
        else f"{secs / 60:.0f}m ago"
        if secs < 7200
        else f"{secs / 3600:.0f}h ago"
    )


def _model(name: Any, version: Any) -> str:
    return f"{name} v{version}" if name else "-"


def _fmt(value: float | None, spec: str) -> str:
    """A number with `spec`, or '-' when the device did not report it."""
    return "-" if value is None else format(value, spec)


def _rollout_table(row: dict[str, Any]) -> Any:
    from rich.table import Table

    settings = row.get("settings") or {}
    wave = int(settings.get("wave", -1))
    soak = settings.get("soak_until")
    title = f"rollout {row['id']}  [bold]{row['status']}[/]  {row['strategy']} → {row['selector']}"
    if wave >= 0:
        title += f"  wave {wave + 1}/{settings.get('waves', '?')}"
    if soak and row["status"] == RolloutStatus.RUNNING:
        title += f"  soak {max(0.0, float(soak) - time.time()):.0f}s left"
    table = Table(title=title, title_justify="left")
    for col in ("device", "wave", "status", "reason"):
        table.add_column(col)
    for dev in row["devices"]:
        status = str(dev["status"])
        color = "green" if status == DeviceStatus.DEPLOYED else "red" if status in SHOWN_FAILED else "yellow"
        table.add_row(
            dev["device_id"], str(int(dev["wave"]) + 1), f"[{color}]{status}[/]", str(dev.get("reason") or "")
        )
    if row.get("reason"):
        table.caption = f"reason: {row['reason']}"
    return table


def _watch(client: Fleet, handle: Any, as_json: bool) -> str:
    """Show live progress until the rollout ends; returns its status."""
    from rich.console import Console
    from rich.live import Live

    if as_json:
        return str(handle.wait())
    console = Console()
    if not console.is_terminal:  # a pipe or a file gets the final table once, as plain text
        status = str(handle.wait())
        print_table(_rollout_table(client.rollout(handle.id)), console)
        return status
    with Live(_rollout_table(client.rollout(handle.id)), console=console, refresh_per_second=4) as live:
        while handle.thread is not None and handle.thread.is_alive():
            handle.thread.join(0.25)
            live.update(_rollout_table(client.rollout(handle.id)))
        live.update(_rollout_table(client.rollout(handle.id)))
    return str(handle.wait())


def _finish(client: Fleet, rollout_id: str, status: str, as_json: bool) -> None:
    row = client.rollout(rollout_id)
    if as_json:
        _dump(row)
    if status == RolloutStatus.ABORTED:
        raise _err(f"rollout {rollout_id} aborted: {row.get('reason')}", EXIT_ABORTED)
    if status not in (RolloutStatus.SUCCEEDED, RolloutStatus.COMPLETED):
        raise _err(
            f"rollout {rollout_id} stopped in state {status}; resume it with `edgefleet rollout {rollout_id} --resume`",
            EXIT_FAILED,
        )


def register(app: typer.Typer) -> None:
    """Attach devices, deploy, rollouts, rollout and telemetry."""

    @app.command("devices")
    def devices(
        broker: Optional[str] = _BROKER,
        db: Optional[str] = _DB,
        fleet: str = _FLEET,
        username: Optional[str] = _USER,
        password: Optional[str] = _PASSWORD,
        tls_ca: Optional[Path] = _CA,
        tls_cert: Optional[Path] = _CERT,
        tls_key: Optional[Path] = _KEY,
        no_refresh: bool = typer.Option(
            False, "--no-refresh", help="Show the store only; do not ask the broker."
        ),
        as_json: bool = _JSON,
    ) -> None:
        """Fleet table: online, profile, tags, agent, active vs desired model, last telemetry."""
        from edgefleet.sdk.fleet.errors import FleetError

        client = _open(broker, db, fleet, username, password, tls_ca, tls_cert, tls_key)
        try:
            rows = client.devices(refresh=not no_refresh)
        except FleetError as exc:
            raise _err(f"{exc} (use --no-refresh to show what the store holds)", EXIT_FAILED) from None
        latest = {d["device_id"]: client.store.latest_telemetry(fleet, d["device_id"]) for d in rows}
        if as_json:
            for d in rows:
                t = latest[d["device_id"]]
                d["last_telemetry"] = t[0] if t else None
                d["differs"] = d.get("desired_model") is not None and (
                    d["desired_model"],
                    d["desired_version"],
                ) != (
                    d.get("active_model"),
                    d.get("active_version"),
                )
            _dump(rows)
            return
        from rich.table import Table

        table = Table(title=f"fleet {fleet}: {len(rows)} devices", title_justify="left")
        for col in (
            "device",
            "online",
            "profile",
            "tags",
            "agent",
            "active",
            "desired",
            "p95 ms",
            "telemetry",
        ):
            table.add_column(col)
        for d in rows:
            t = latest[d["device_id"]]
            desired = _model(d.get("desired_model"), d.get("desired_version"))
            active = _model(d.get("active_model"), d.get("active_version"))
            differs = d.get("desired_model") is not None and desired != active
            table.add_row(
                d["device_id"],
                "[green]yes[/]" if d["online"] else "[red]no[/]",
                str(d.get("profile") or "-"),
                ",".join(d.get("tags") or []) or "-",
                str(d.get("agent_version") or "-"),
                active,
                f"[yellow]{desired}[/]" if differs else desired,
                f"{t[0]['p95_ms']:.3f}" if t and t[0].get("p95_ms") is not None else "-",
                _age(t[0]["ts"]) if t else "-",
            )
        print_table(table)

    @app.command("deploy")
    def deploy(
        bundles: list[Path] = typer.Argument(
            ..., help="Bundle folders or .tar files (one per profile), or a build output folder."
        ),
        to: str = typer.Option(..., "--to", help="Targets: a device id, tag:NAME, profile:NAME or all."),
        strategy: str = typer.Option("all", "--strategy", help="all, canary:PCT or waves:P1,P2,...,100."),
        soak: float = typer.Option(
            0.0, "--soak", min=0, help="Seconds to watch each wave's telemetry before the next."
        ),
        timeout: float = typer.Option(
            600.0,
            "--timeout",
            min=0.1,
            help="Seconds a device may take (offline ones included) before it counts as timed out.",
        ),
        max_failed_pct: float = typer.Option(
            0.0, "--max-failed-pct", help="Abort when more than this % of finished devices failed."
        ),
        min_finished: int = typer.Option(
            1, "--min-finished", help="Judge the failure share only after this many devices finished."
        ),
        max_p95_ms: Optional[float] = typer.Option(
            None,
            "--max-p95-ms",
            help="Abort when updated devices' p95 latency exceeds this (default: the manifest's).",
        ),
        min_accuracy: Optional[float] = typer.Option(
            None,
            "--min-accuracy",
            help="Abort when updated devices' accuracy (labels) drops below this (default: the manifest's).",
        ),
        min_agreement: Optional[float] = typer.Option(
            None,
            "--min-agreement",
            help="Abort when updated devices' agreement with the reference model's top-1 drops below this.",
        ),
        min_fidelity: Optional[float] = typer.Option(
            None,
            "--min-fidelity",
            help="Abort when updated devices' fidelity (mean cosine to the reference outputs) drops below this.",
        ),
        min_samples: int = typer.Option(
            MIN_WINDOWS,
            "--min-samples",
            min=1,
            help="Telemetry windows (per device for latency) needed before the telemetry rules may abort.",
        ),
        min_requests: int = typer.Option(
            MIN_REQUESTS,
            "--min-requests",
            min=1,
            help="Live requests needed before the latency and live-agreement rules may abort.",
        ),
        skip_offline: bool = typer.Option(
            False,
            "--skip-offline",
            help="Leave out offline devices (default: tell them too and wait up to --timeout).",
        ),
        no_telemetry_rules: bool = typer.Option(
            False, "--no-telemetry-rules", help="Abort on failures only, not on telemetry."
        ),
        skip_unmatched: bool = typer.Option(
            False, "--skip-unmatched", help="Leave out (and report) devices with no bundle for their profile."
        ),
        chunk_size: Optional[int] = typer.Option(
            None, "--chunk-size", min=1024, help="Chunk bytes (default 256 KiB, capped by the broker)."
        ),
        no_delta: bool = typer.Option(
            False,
            "--no-delta",
            help="Always send whole files, never bsdiff4 patches against the running version.",
        ),
        trusted_key: list[Path] = typer.Option(
            [],
            "--trusted-key",
            help="Public key(s) the bundles must be signed with (default ~/.edgefleet/keys/fleet.pub).",
        ),
        broker: Optional[str] = _BROKER,
        db: Optional[str] = _DB,
        fleet: str = _FLEET,
        username: Optional[str] = _USER,
        password: Optional[str] = _PASSWORD,
        tls_ca: Optional[Path] = _CA,
        tls_cert: Optional[Path] = _CERT,
        tls_key: Optional[Path] = _KEY,
        as_json: bool = _JSON,
    ) -> None:
        """Roll bundles out to devices with a strategy; exits 3 when the rollout aborts."""
        from edgefleet.sdk.fleet.errors import BrokerUnavailable, FleetError
        from edgefleet.sdk.fleet.strategy import AbortRules

        client = _open(broker, db, fleet, username, password, tls_ca, tls_cert, tls_key, list(trusted_key))
        try:
            rules = AbortRules(
                max_failed_pct=max_failed_pct,
                min_finished=min_finished,
                telemetry=not no_telemetry_rules,
                min_samples=min_samples,
                min_requests=min_requests,
                max_p95_ms=max_p95_ms,
                min_accuracy=min_accuracy,
                min_agreement=min_agreement,
                min_fidelity=min_fidelity,
            )
            handle = client.deploy(
                [str(b) for b in bundles],
                to,
                strategy=strategy,
                soak_s=soak,
                timeout_s=timeout,
                rules=rules,
                skip_unmatched=skip_unmatched,
                skip_offline=skip_offline,
                chunk_size=chunk_size,
                delta=not no_delta,
                wait=False,
            )
        except BrokerUnavailable as exc:
            raise _err(str(exc), EXIT_FAILED) from None
        except FleetError as exc:
            raise _err(f"{exc}; nothing was sent", EXIT_REFUSED) from None
        try:
            status = _watch(client, handle, as_json)
        except KeyboardInterrupt:
            raise _err(
                f"stopped watching; rollout {handle.id} pauses until `edgefleet rollout {handle.id} --resume`",
                EXIT_FAILED,
            ) from None
        _finish(client, handle.id, status, as_json)

    @app.command("rollouts")
    def rollouts(
        db: Optional[str] = _DB,
        fleet: str = _FLEET,
        limit: int = typer.Option(20, "--limit", min=1, help="How many, newest first."),
        as_json: bool = _JSON,
    ) -> None:
        """Rollouts, newest first: status, strategy, targets, progress."""
        from edgefleet.sdk.store import Store, StoreError

        try:
            store = Store(db)
        except StoreError as exc:
            raise _err(str(exc), EXIT_FAILED) from None
        rows = store.rollouts(fleet)[:limit]
        full = [store.rollout(r["id"]) for r in rows]
        if as_json:
            _dump(full)
            return
        from rich.table import Table

        table = Table(title=f"rollouts of fleet {fleet}", title_justify="left")
        cols = (
            "id",
            "status",
            "strategy",
            "to",
            "devices",
            "deployed",
            "failed",
            "devices now",
            "started",
            "reason",
        )
        for col in cols:
            table.add_column(col)
        for r in full:
            if r is None:
                continue
            statuses = [d["status"] for d in r["devices"]]
            failed = sum(s in SHOWN_FAILED for s in statuses)
            table.add_row(
                r["id"],
                r["status"],
                r["strategy"],
                r["selector"],
                str(len(statuses)),
                str(statuses.count(DeviceStatus.DEPLOYED)),
                str(failed),
                # Per-device truth: what an aborted rollout left on each device (rolled-back, ...).
                ", ".join(f"{statuses.count(s)} {s}" for s in sorted(set(map(str, statuses)))),
                _age(r["created_at"]),
                str(r.get("reason") or ""),
            )
        print_table(table)

    @app.command("rollout")
    def rollout(
        rollout_id: str = typer.Argument(..., help="Rollout id (see `edgefleet rollouts`)."),
        abort: bool = typer.Option(
            False, "--abort", help="Abort: roll back the devices reached, notify no more."
        ),
        reason: str = typer.Option(
            "aborted from the command line", "--reason", help="Why (kept with the rollout)."
        ),
        resume: bool = typer.Option(False, "--resume", help="Carry on a rollout whose host process stopped."),
        broker: Optional[str] = _BROKER,
        db: Optional[str] = _DB,
        fleet: str = _FLEET,
        username: Optional[str] = _USER,
        password: Optional[str] = _PASSWORD,
        tls_ca: Optional[Path] = _CA,
        tls_cert: Optional[Path] = _CERT,
        tls_key: Optional[Path] = _KEY,
        as_json: bool = _JSON,
    ) -> None:
        """One rollout's progress, failures and abort reason; --abort or --resume act on it."""
        from edgefleet.sdk.fleet.errors import FleetError, RolloutConflict, RolloutNotFound

        client = _open(broker, db, fleet, username, password, tls_ca, tls_cert, tls_key)
        try:
            row = client.rollout(rollout_id)
            if abort:
                client.abort(rollout_id, reason, wait=True)
                status = _wait_ended(client, rollout_id)
                row = client.rollout(rollout_id)
                if status != RolloutStatus.ABORTED:
                    raise _err(
                        f"rollout {rollout_id} is still {status}: the process driving it has not finished "
                        "the rollback; check again with `edgefleet rollout ID`",
                        EXIT_FAILED,
                    )
                if as_json:
                    _dump(row)
                else:
                    print_table(_rollout_table(row))
                return
            if resume:
                handle = client.resume(rollout_id, wait=False)
                _finish(client, rollout_id, _watch(client, handle, as_json), as_json)
                return
        except (RolloutNotFound, RolloutConflict) as exc:
            raise _err(str(exc), EXIT_REFUSED) from None
        except FleetError as exc:
            raise _err(str(exc), EXIT_FAILED) from None
        if as_json:
            _dump(row)
            return
        print_table(_rollout_table(row))

    @app.command("telemetry")
    def telemetry(
        device: str = typer.Argument(..., help="Device id."),
        since: Optional[float] = typer.Option(None, "--since", help="Only the last SECONDS."),
        bucket: float = typer.Option(60.0, "--bucket", min=0.001, help="Seconds per row of the series."),
        db: Optional[str] = _DB,
        fleet: str = _FLEET,
        as_json: bool = _JSON,
    ) -> None:
        """Latency p50/p95/p99, quality (accuracy, agreement, fidelity) and CPU/RSS/temperature of one device."""
        from edgefleet.sdk.fleet.client import Fleet
        from edgefleet.sdk.fleet.errors import FleetError
        from edgefleet.sdk.store import Store, StoreError

        try:
            store = Store(db)
        except StoreError as exc:
            raise _err(str(exc), EXIT_FAILED) from None
        client = Fleet(broker=None, store=store, fleet=fleet, trusted_keys=[])
        try:
            data = client.telemetry(device, since=time.time() - since if since else None, bucket_s=bucket)
        except FleetError as exc:
            raise _err(str(exc), EXIT_REFUSED) from None
        if as_json:
            _dump(data)
            return
        from rich.console import Console
        from rich.table import Table

        console = Console()
        latest = data["latest"]
        if latest is None:
            console.print(f"{device}: no telemetry stored yet (is `edgefleet serve --broker ...` ingesting?)")
            return
        report = client.latest_report(device)
        system = report.system if report is not None else SystemMetrics()
        console.print(
            f"[bold]{device}[/] {_model(latest.get('model_name'), latest.get('model_version'))} "
            f"({_age(latest['ts'])}): cpu {_fmt(system.process_cpu_percent, '.1f')}%, "
            f"rss {_fmt(system.rss_mb, '.1f')} MB, temp {_fmt(system.temp_c, '.1f')} °C, "
            f"missing messages {sum(g['last_missing'] - g['first_missing'] + 1 for g in data['gaps'])}"
        )
        for label, points in data["series"].items():
            table = Table(title=label, title_justify="left")
            for col in ("time", "requests", "p50 ms", "p95 ms", "p99 ms", *QUALITY_HEADERS):
                table.add_column(col)
            for p in points[-30:]:
                table.add_row(
                    time.strftime("%H:%M:%S", time.localtime(p["ts"])),
                    str(p["count"]),
                    *(f"{p[k]:.3f}" if p[k] is not None else "-" for k in ("p50_ms", "p95_ms", "p99_ms")),
                    *(f"{p[k]:.4f}" if p.get(k) is not None else "-" for k in QUALITY_KEYS),
                )
            print_table(table, console)


def _wait_ended(client: Fleet, rollout_id: str, timeout_s: float = 120.0) -> str:
    """Poll the store until the rollout ended (an engine in another process may be rolling back)."""
    deadline = time.monotonic() + timeout_s
    status = str(client.rollout(rollout_id)["status"])
    while status not in ENDED_ROLLOUT and time.monotonic() < deadline:
        time.sleep(0.2)
        status = str(client.rollout(rollout_id)["status"])
    return status
