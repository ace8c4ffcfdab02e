"""`edgefleet profiles list|show`: the built-in device profiles and users' own profile files.

Exit codes: 0 success; 2 unknown profile name, missing or invalid profile file (the message names the
file, the field and the allowed values).
"""

from __future__ import annotations

import json
from typing import Any, Dict, List

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
