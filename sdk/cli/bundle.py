"""`edgefleet inspect` and `edgefleet bundle pack|unpack`: look into bundles and move them between folder and .tar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer

from edgefleet.sdk.cli.errors import fail as _fail
from edgefleet.sdk.cli.output import print_table


def _print_report(info: dict[str, Any]) -> None:
    """Human-readable inspect output."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    manifest = info.get("manifest") or {}
    if manifest:
        model, target, health = manifest["model"], manifest["target"], manifest["health"]
        console.print(f"[bold]{manifest['name']}[/] v{manifest['version']}  ({info['path']})")
        console.print(
            f"target {target['profile']}"
            + (f" devices {', '.join(target['device_ids'])}" if target["device_ids"] else "")
            + f" | {model['format']} on {model['runtime']}"
            + (f" ≥ {model['min_runtime_version']}" if model["min_runtime_version"] else "")
            + (f" opset {model['opset']}" if model["opset"] else "")
        )
        console.print(
            f"created {manifest['created']}  expires {manifest['expires']}"
            + ("  [red](EXPIRED)[/]" if info.get("expired") else "")
        )
        for kind in ("inputs", "outputs"):
            for t in manifest[kind]:
                console.print(
                    f"{kind[:-1]:>6} {t['name']} {t['dtype']} {t['shape']} {t['preprocessing']}".rstrip()
                )
        table = Table("file", "declared bytes", "on disk bytes")
        for f in info.get("files", []):
            table.add_row(
                f["path"], str(f["declared_size"]), "missing" if f["size"] is None else str(f["size"])
            )
        print_table(table, console)
        if manifest["compression"]:
            console.print("compression: " + json.dumps(manifest["compression"]))
        if info.get("metrics"):
            console.print("metrics: " + ", ".join(f"{k}={v}" for k, v in sorted(info["metrics"].items())))
        console.print("health: " + ", ".join(f"{k}={v}" for k, v in health.items() if v is not None))
        console.print("signed by: " + (", ".join(str(k) for k in info.get("signed_by", [])) or "nobody"))
    if info["verified"] is True:
        console.print(
            "[green]VERIFIED[/]: signature by a trusted key, every file matches its size and sha256"
        )
    elif info["verified"] is None:
        console.print("[yellow]files match the manifest; signature NOT checked[/] (give --key fleet.pub)")
    else:
        # One unwrapped line, so scripts can grep for it.
        console.print(f"[red]TAMPERED: {info['code']}: {info['reason']}[/]", soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Attach `inspect` and the `bundle` group."""

    @app.command("inspect")
    def inspect(
        bundle: Path = typer.Argument(..., help="Bundle folder or .tar."),
        key: Optional[list[Path]] = typer.Option(
            None,
            "--key",
            help="Public key(s) to verify against (default ~/.edgefleet/keys/fleet.pub if present).",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Show a bundle's manifest, sizes and metrics, and whether it verifies; exits non-zero when tampered."""
        from edgefleet.agent.core.errors import VerifyError
        from edgefleet.sdk.trust.bundle import BundleError, inspect_bundle, load_bundle
        from edgefleet.sdk.trust.keys import PUBLIC_KEY_FILE, default_key_dir

        keys = list(key or [])
        if not keys and (default_key_dir() / PUBLIC_KEY_FILE).is_file():
            keys = [default_key_dir() / PUBLIC_KEY_FILE]
        try:
            with load_bundle(bundle) as folder:
                info = inspect_bundle(folder, [str(k) for k in keys])
        except (BundleError, VerifyError) as exc:
            info = {
                "path": str(bundle),
                "verified": False,
                "code": exc.code,
                "reason": exc.reason,
                "manifest": None,
            }
        info["path"] = str(bundle)
        if as_json:
            typer.echo(json.dumps(info, indent=2, sort_keys=True))
        else:
            _print_report(info)
        if info["verified"] is False:
            raise typer.Exit(1)

    bundle_app = typer.Typer(help="Move bundles between a folder and one .tar file.", no_args_is_help=True)
    app.add_typer(bundle_app, name="bundle")

    @bundle_app.command("pack")
    def pack_cmd(
        directory: Path = typer.Argument(..., help="Bundle folder."),
        tar: Path = typer.Argument(..., help="Output .tar."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Pack a bundle folder into one reproducible .tar."""
        from edgefleet.sdk.trust.bundle import BundleError, pack

        try:
            out = pack(directory, tar)
        except BundleError as exc:
            raise _fail(exc.reason) from None
        size = out.stat().st_size
        typer.echo(
            json.dumps({"tar": str(out), "bytes": size})
            if as_json
            else f"packed {directory} → {out} ({size} bytes)"
        )

    @bundle_app.command("unpack")
    def unpack_cmd(
        tar: Path = typer.Argument(..., help="Bundle .tar."),
        directory: Path = typer.Argument(..., help="New (or empty) folder to unpack into."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Unpack a bundle .tar, refusing absolute paths, `..`, links and device files."""
        from edgefleet.agent.core.errors import VerifyError
        from edgefleet.sdk.trust.bundle import BundleError, unpack

        try:
            out = unpack(tar, directory)
        except (BundleError, VerifyError) as exc:
            raise _fail(f"{exc.code}: {exc.reason}") from None
        files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
        typer.echo(
            json.dumps({"dir": str(out), "files": files})
            if as_json
            else f"unpacked {tar} → {out}: {', '.join(files)}"
        )
