"""`edgefleet profiles list|show|calibrate`: the built-in device profiles and users' own profile files.

`calibrate PROFILE --out user.toml` fits the profile's [efficiency] table (the estimator's per-op-class
efficiency) to the latencies its devices reported for known models and writes a user profile
(docs/profiles.md). It reads the fleet store (`--db`: telemetry windows, and each model version's
model file from its stored bundle) or a recorded export (`--telemetry FILE --model NAME=PATH ...`).

Exit codes: 0 success; 2 unknown profile name, missing or invalid profile file (the message names the
file, the field and the allowed values), or telemetry/model arguments that cannot calibrate it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import typer

from edgefleet.sdk.cli.errors import fail
from edgefleet.sdk.cli.output import print_table

EXIT_BAD_PROFILE = 2

_SHOW_ORDER = (
    "name",
    "description",
    "cpu_model",
    "cores",
    "clock_ghz",
    "isa",
    "sustained_gflops",
    "fp16_speedup",
    "int8_speedup",
    "ram_mb",
    "mem_bandwidth_gbs",
    "gpu",
    "runtimes",
    "precisions",
    "python",
    "os",
    "max_model_mb",
    "p95_latency_ms",
    "batch_size",
    "threads",
    "efficiency",
    "path",
)


def _fail(message: str, code: int = EXIT_BAD_PROFILE) -> typer.Exit:
    """Print a user error to stderr and return the Exit to raise."""
    return fail(message, code)


def _fmt(value: Any) -> str:
    """A field value as one readable line."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    if isinstance(value, dict):
        return "; ".join(f"{k}={_fmt(v)}" for k, v in value.items())
    return str(value)


def register(app: typer.Typer) -> None:
    """Attach the `profiles` command group."""
    profiles_app = typer.Typer(
        help="Device profiles: what each target runs and how fast (exit 2 on an unknown or invalid profile).",
        no_args_is_help=True,
    )
    app.add_typer(profiles_app, name="profiles")
    register_calibrate(profiles_app)

    @profiles_app.command("list")
    def list_profiles(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
        """List the built-in profiles: CPU, cores, RAM, runtimes and budgets. Exit 2 if one fails to load."""
        from edgefleet.device_profiles import ProfileError, builtin_names, load_profile

        rows: List[Dict[str, Any]] = []
        for name in builtin_names():
            try:
                rows.append(load_profile(name).to_dict())
            except ProfileError as exc:
                raise _fail(str(exc)) from None
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        from rich.table import Table

        table = Table(title="edgefleet device profiles")
        table.add_column("name", no_wrap=True)
        table.add_column("cpu (+gpu)")
        for column in ("cores", "RAM MB", "GFLOP/s", "GB/s"):
            table.add_column(column, justify="right")
        table.add_column("runtimes", no_wrap=True)
        table.add_column("max MB", justify="right")
        table.add_column("p95 ms", justify="right")
        for row in rows:
            cpu = row["cpu_model"] + (f" + {row['gpu']['name']}" if row["gpu"] else "")
            table.add_row(
                row["name"],
                cpu,
                str(row["cores"]),
                str(row["ram_mb"]),
                f"{row['sustained_gflops']:g}",
                f"{row['mem_bandwidth_gbs']:g}",
                "\n".join(row["runtimes"]),
                f"{row['max_model_mb']:g}",
                f"{row['p95_latency_ms']:g}",
            )
        print_table(table)

    @profiles_app.command("show")
    def show(
        name_or_path: str = typer.Argument(
            ..., metavar="NAME_OR_PATH", help="Built-in name or a .toml path."
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
        refresh: bool = typer.Option(
            False, "--refresh", help="For `host`: measure again, ignoring the cache."
        ),
    ) -> None:
        """Show every field of a profile with its source. Exit 2 on an unknown name or an invalid file."""
        from edgefleet.device_profiles import ProfileError, load_profile

        try:
            if refresh and name_or_path == "host":
                from edgefleet.device_profiles.host import load_host_profile

                profile = load_host_profile(refresh=True)
            else:
                profile = load_profile(name_or_path)
        except ProfileError as exc:
            raise _fail(str(exc)) from None
        doc = profile.to_dict()
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        from rich.table import Table

        table = Table(title=f"profile {profile.name}", show_lines=False)
        table.add_column("field")
        table.add_column("value")
        table.add_column("source")
        sources = doc["sources"]
        for key in _SHOW_ORDER:
            table.add_row(key, _fmt(doc[key]), sources.get(key, ""))
        print_table(table)


def _pairs(values: Optional[List[str]], what: str) -> Dict[str, str]:
    """KEY=VALUE options as a dict; a malformed one is a user error naming the option."""
    out: Dict[str, str] = {}
    for raw in values or []:
        key, sep, value = raw.partition("=")
        if not sep or not key or not value:
            raise _fail(f"{what} {raw!r} must be KEY=VALUE (e.g. {what} speech=model.onnx)")
        out[key] = value
    return out


def register_calibrate(profiles_app: typer.Typer) -> None:
    """Attach `profiles calibrate`."""

    @profiles_app.command("calibrate")
    def calibrate(
        name_or_path: str = typer.Argument(..., metavar="PROFILE", help="Built-in name or a .toml path."),
        telemetry: Optional[Path] = typer.Option(
            None,
            "--telemetry",
            help="Recorded telemetry: JSON list, JSON lines or CSV with model_name, p50_ms (else: the store).",
        ),
        db: Optional[str] = typer.Option(
            None,
            "--db",
            help="Fleet store to read telemetry and bundles from: sqlite:///PATH or postgresql://... "
            "(default: EDGEFLEET_DB, else the store `edgefleet serve` keeps under EDGEFLEET_HOME).",
        ),
        fleet: str = typer.Option("default", "--fleet", help="Fleet name in the store."),
        model: Optional[List[str]] = typer.Option(
            None,
            "--model",
            help="NAME[:VERSION]=PATH of a model the telemetry reports (repeat); with the store, "
            "overrides the stored bundle's model file.",
        ),
        dim: Optional[List[str]] = typer.Option(
            None, "--dim", help="NAME=VALUE for a dynamic input dimension (e.g. sequence=128)."
        ),
        out: Path = typer.Option(..., "--out", help="Where to write the calibrated profile TOML."),
        force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
        as_json: bool = typer.Option(False, "--json", help="Print the fit as JSON."),
    ) -> None:
        """Fit the profile's per-op-class efficiency to latencies its devices reported; write a user TOML."""
        from edgefleet.device_profiles import ProfileError, load_profile
        from edgefleet.sdk.build.estimate import EstimateError
        from edgefleet.sdk.build.estimate_fit import (
            fit_efficiency,
            observations,
            profile_toml,
            read_telemetry,
        )

        if telemetry is not None and db is not None:
            raise _fail("give --telemetry FILE or --db URL, not both: calibrate reads one of them")
        models = {k: Path(v) for k, v in _pairs(model, "--model").items()}
        if not models and telemetry is not None:
            raise _fail("give at least one --model NAME=PATH: the model files the telemetry reports on")
        for key, path in models.items():
            if not path.is_file():
                raise _fail(f"--model {key}={path}: no such model file")
        dims = {k: int(v) for k, v in _pairs(dim, "--dim").items() if v.isdigit()}
        if out.exists() and not force:
            raise _fail(f"{out} exists; choose another --out or pass --force")
        skipped: List[str] = []
        try:
            profile = load_profile(name_or_path)
            if telemetry is not None:
                source = telemetry.name
                rows = read_telemetry(telemetry)
            else:
                source, rows, models, skipped = _from_store(db, fleet, profile.name, models)
            obs = observations(rows, profile.name, models)
            if not obs and skipped:
                raise _fail(
                    f"no model that devices on {profile.name!r} reported has a model file here:\n  "
                    + "\n  ".join(skipped)
                    + "\ngive it with --model NAME:VERSION=PATH"
                )
            result = fit_efficiency(obs, profile, dims)
        except (ProfileError, EstimateError) as exc:
            raise _fail(str(exc)) from None
        note = (
            f"efficiency fitted by `edgefleet profiles calibrate {name_or_path}` from {source}: "
            + ", ".join(f"{o.model} {o.latency_ms:.3g} ms ({o.reports} reports)" for o in obs)
        )
        text = profile_toml(profile, result.efficiency, note)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        try:
            load_profile(str(out))  # what was written must load
        except ProfileError as exc:  # a bug here, not the user's: say so with the file kept for a report
            raise _fail(f"the calibrated profile {out} does not load: {exc}", 1) from None
        fitted: List[Dict[str, Any]] = [
            {
                "model": o.model,
                "path": str(o.path),
                "reported_ms": o.latency_ms,
                "reports": o.reports,
                "estimate_over_reported_before": result.before[o.model],
                "estimate_over_reported_after": result.after[o.model],
            }
            for o in obs
        ]
        doc = {
            "profile": profile.name,
            "source": source,
            "out": str(out),
            "efficiency": result.efficiency,
            "models": fitted,
            "skipped": skipped,
        }
        if as_json:
            typer.echo(json.dumps(doc, indent=2))
            return
        for line in skipped:
            typer.echo(f"skipped {line}", err=True)
        for row in fitted:
            typer.echo(
                f"{row['model']}: reported {row['reported_ms']:.3f} ms; estimate/reported "
                f"{row['estimate_over_reported_before']:.2f} → {row['estimate_over_reported_after']:.2f}"
            )
        typer.echo(f"efficiency: {json.dumps(result.efficiency)}")
        typer.echo(f"wrote {out} (use it as: edgefleet build ... --profile {out})")


def _from_store(
    db: Optional[str], fleet: str, profile: str, given: Dict[str, Path]
) -> Tuple[str, List[Dict[str, Any]], Dict[str, Path], List[str]]:
    """(source label, telemetry rows, model files, versions left without a file) from the fleet store."""
    from edgefleet.sdk.build.estimate_fit import store_models, store_rows
    from edgefleet.sdk.store import Store, StoreError, default_db_url

    url = db or default_db_url()
    if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        path = Path(url[len("sqlite:///") :])
        if not path.is_file():
            # opening would create an empty store: say where the telemetry should have been instead
            raise _fail(
                f"no fleet store at {path}; pass --db URL (the one `edgefleet serve` uses) or --telemetry FILE"
            )
    try:
        store = Store(url)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    try:
        rows = store_rows(store, fleet, profile)
        models, skipped = store_models(store, rows, profile, given)
    except StoreError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.close()
    if not rows:
        raise _fail(
            f"the store at {store.engine.url.render_as_string(hide_password=True)} has no latency telemetry of profile {profile!r} in fleet "
            f"{fleet!r}; check --fleet and the profile name"
        )
    return f"the fleet store ({fleet}, {len(rows)} telemetry windows)", rows, models, skipped
