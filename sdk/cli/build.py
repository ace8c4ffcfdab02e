"""`edgefleet build MODEL --profile NAME ... -o BUNDLE`: convert, compress, measure, pick, bundle."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from edgefleet.sdk.cli.errors import fail as _fail
from edgefleet.sdk.cli.output import build_log_path, library_output_to, print_table, report_build_log

if TYPE_CHECKING:
    from rich.table import Table


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _speed(cand: dict[str, Any]) -> str:
    """Speed relative to fp32 with its noise band ("1.02±0.03"); inside the band it is a tie."""
    speed, noise = cand.get("speedup_vs_fp32"), cand.get("speedup_noise")
    if speed is None:
        return "—"
    return f"{speed:.2f}±{noise:.2f}" if noise else f"{speed:.2f}"


def candidates_table(report: dict[str, Any]) -> Table:
    """A rich table of every candidate in a build report, the chosen one marked."""
    from rich.table import Table

    metric = report["data"].get("metric") or "quality"
    table = Table(title=f"build for {report['profile']['name']}: {len(report['candidates'])} candidates")
    for column in (
        "candidate",
        "format",
        "precision",
        "size KB",
        metric,
        "drop",
        "p50 ms",
        "p95 ms",
        "× fp32",
        "target ms",
        "status",
    ):
        table.add_column(
            column, justify="left" if column in ("candidate", "format", "precision", "status") else "right"
        )
    for cand in report["candidates"]:
        quality = cand.get("quality") or {}
        latency = cand.get("host_latency_ms") or {}
        status = cand["status"]
        style = (
            "bold green"
            if cand["id"] == report["chosen"]
            else ("red" if status == "failed" else ("yellow" if status == "over-budget" else ""))
        )
        label = f"{cand['id']} ✓" if cand["id"] == report["chosen"] else cand["id"]
        table.add_row(
            label,
            cand["format"],
            cand["precision"],
            _fmt(cand["size_bytes"] / 1024 if cand.get("size_bytes") else None, ".1f"),
            _fmt(quality.get("value"), ".4f"),
            _fmt(cand.get("accuracy_drop"), "+.4f"),
            _fmt(latency.get("p50"), ".3f"),
            _fmt(latency.get("p95"), ".3f"),
            _speed(cand),
            _fmt(cand.get("estimated_target_latency_ms"), ".2f"),
            status if status == "ok" else f"{status}: {cand['reason']}",
            style=style,
        )
    return table


def sensitivity_table(report: dict[str, Any]) -> Optional[Table]:
    """The per-layer sensitivity table of a build report (S and the perturbation used), or None."""
    from rich.table import Table

    sens = report.get("sensitivity") or {}
    rows = sens.get("layers")
    if not rows:
        return None
    baseline = sens.get("baseline_loss")
    loss = f" ({sens['loss']})" if sens.get("loss") else ""
    table = Table(
        title=f"per-layer sensitivity: {sens.get('formula', 'S = (L − L_perturbed) / L')}; "
        f"L = {_fmt(baseline, '.4g')}{loss}; most sensitive first",
        caption=f"perturbation: {sens.get('description') or sens.get('perturbation', '?')} "
        f"(from the {sens.get('source', 'build')})",
    )
    for column in ("#", "layer", "kind", "params", "L perturbed", "S"):
        table.add_column(column, justify="left" if column in ("layer", "kind") else "right")
    for row in rows:
        table.add_row(
            str(row.get("rank", "")),
            str(row.get("layer", "")),
            str(row.get("kind", "")),
            f"{row['params']:,}" if isinstance(row.get("params"), int) else "—",
            _fmt(row.get("loss_perturbed"), ".4g"),
            _fmt(row.get("S"), "+.4g"),
        )
    return table


def print_sensitivity(report: dict[str, Any], console: Any) -> None:
    """Print the sensitivity table (rich on a terminal, plain in a pipe), or one line on why there is none."""
    from rich.markup import escape

    table = sensitivity_table(report)
    if table is not None:
        print_table(table, console)
    elif (report.get("sensitivity") or {}).get("unavailable"):
        console.print(
            f"[dim]per-layer sensitivity: {escape(report['sensitivity']['unavailable'])}[/]",
            highlight=False,
            soft_wrap=True,
        )


def register(app: typer.Typer) -> None:
    """Attach `build` to the app."""

    @app.command("build")
    def build_command(
        model: Path = typer.Argument(
            ...,
            help="torch.export .pt2 (dynamic or static batch), TorchScript .pt, .onnx or .tflite file, or "
            "MODEL.py:NAME — your script's nn.Module (instance, class, or function returning one), which "
            "structured pruning and --student auto need.",
        ),
        profile: list[str] = typer.Option(
            ...,
            "--profile",
            "-p",
            help="Device profile name or the path of a profile TOML; repeat it for a release: OUT/<profile>/ each.",
        ),
        out: Optional[Path] = typer.Option(
            None, "--out", "-o", help="Bundle folder to write (report.json goes inside)."
        ),
        version: Optional[int] = typer.Option(
            None,
            "--version",
            help="Release number in the manifest (default: the build time); one for all profiles.",
        ),
        exporter: Optional[str] = typer.Option(
            None,
            "--exporter",
            help="torch → ONNX exporter: auto (both, keep the faster), dynamo or torchscript "
            "(default: dynamo for .pt2 with a fallback, torchscript for TorchScript).",
        ),
        calib: Optional[Path] = typer.Option(
            None, "--calib", help=".npz with 'x' (and optional 'y') for calibration."
        ),
        eval_data: Optional[Path] = typer.Option(
            None, "--eval", help=".npz with 'x' and optional labels 'y' for evaluation."
        ),
        task: str = typer.Option(
            "auto",
            "--task",
            help="Quality metric by task: classification (accuracy / top-1 agreement), detection (mAP@0.5), "
            "ctc (token error rate), embedding (cosine), or auto (inferred; docs/quality.md).",
        ),
        max_accuracy_drop: float = typer.Option(
            0.01,
            "--max-accuracy-drop",
            help="Largest quality loss allowed: accuracy with labels (0.01 = one point), else fidelity to fp32; also the devices' health floor.",
        ),
        input_shape: Optional[str] = typer.Option(
            None,
            "--input-shape",
            help="Input shape(s) when no data is given, e.g. 1,3,224,224 (';' between inputs).",
        ),
        key: Optional[Path] = typer.Option(
            None, "--key", help="Signing key (default: the fleet key from `edgefleet keys init`)."
        ),
        name: Optional[str] = typer.Option(
            None, "--name", help="Model name in the manifest (default: the file's stem)."
        ),
        only: Optional[str] = typer.Option(
            None, "--only", help="Comma-separated candidate ids to try (the fp32 baseline always runs)."
        ),
        no_prune: bool = typer.Option(False, "--no-prune", help="Skip the pruned candidates."),
        finetune_epochs: int = typer.Option(10, "--finetune-epochs", help="Fine-tune epochs after pruning."),
        no_sensitivity: bool = typer.Option(
            False,
            "--no-sensitivity",
            help="Skip the per-layer sensitivity table (one forward pass per layer).",
        ),
        student: Optional[str] = typer.Option(
            None,
            "--student",
            help="Add a distilled-student candidate: 'auto' (a shallower copy of a transformer, a narrower "
            "copy of a CNN; needs MODEL.py:NAME or an nn.Module through the Python API), a TorchScript "
            "student .pt, or STUDENT.py:NAME.",
        ),
        student_epochs: int = typer.Option(
            30, "--student-epochs", min=1, help="Distillation epochs for the --student candidate."
        ),
        threads: Optional[int] = typer.Option(
            None, "--threads", help="Threads for host latency (default: the profile's)."
        ),
        candidate_timeout: float = typer.Option(
            900.0,
            "--candidate-timeout",
            help="Seconds one candidate may take in the build's worker process before it is stopped and "
            "reported as timed out (a crash there fails only that candidate).",
        ),
        force: bool = typer.Option(False, "--force", help="Replace an existing bundle in the output folder."),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON instead of tables."),
    ) -> None:
        """Build MODEL for a device profile: convert, compress, measure every candidate, pick, and bundle."""
        from rich.console import Console

        from edgefleet.sdk.build.errors import BudgetError, BuildError
        from edgefleet.sdk.build.model_io import parse_input_shape
        from edgefleet.sdk.build.plan import PlanOptions

        console = Console(stderr=as_json)
        plan = PlanOptions(
            prune_levels=() if no_prune else PlanOptions().prune_levels,
            finetune_epochs=finetune_epochs,
            only=tuple(s.strip() for s in only.split(",") if s.strip()) if only else (),
            student=student,
            student_epochs=student_epochs,
            sensitivity=not no_sensitivity,
        )
        log_path = build_log_path(out)
        options: dict[str, Any] = {
            "calib": calib,
            "eval": eval_data,
            "max_accuracy_drop": max_accuracy_drop,
            "plan": plan,
            "threads": threads,
            "private_key": key,
            "name": name or _safe_name(model.stem),
            "exporter": exporter,
            "candidate_timeout": candidate_timeout,
        }
        try:
            shapes = parse_input_shape(input_shape) if input_shape else None
            options["input_shape"] = shapes
            task = _check_task(task)
            if len(profile) > 1:
                if out is None:
                    raise BuildError("several --profile build a release into OUT/<profile>/; pass --out OUT")
                with _task_scope(task):
                    _build_release(console, model, profile, out, version, force, options, log_path, as_json)
                return
            with library_output_to(log_path), _task_scope(task):  # library warnings: into the log
                result = _run_with_progress(
                    console,
                    lambda progress: _build()(
                        model,
                        profile[0],
                        out=out,
                        progress=progress,
                        overwrite=force,
                        version=version,
                        **options,
                    ),
                    quiet=as_json,
                )
        except BudgetError as exc:
            report_build_log(console, log_path)
            if as_json:
                typer.echo(json.dumps({"error": str(exc), "closest": exc.candidates}, indent=2))
            raise _fail(str(exc), 2) from None
        except BuildError as exc:
            report_build_log(console, log_path)
            raise _fail(str(exc)) from None
        if as_json:
            report_build_log(console, log_path)
            typer.echo(
                json.dumps(
                    {**result.report, "bundle": str(result.bundle_dir) if result.bundle_dir else None},
                    indent=2,
                )
            )
            return
        print_table(candidates_table(result.report), console)
        print_sensitivity(result.report, console)
        console.print(
            f"[bold]chosen:[/] {result.chosen.id} — {result.reason}", highlight=False, soft_wrap=True
        )
        from rich.markup import escape

        for missing in result.unavailable:
            # Reasons hold brackets ("edgefleet[host]") that rich would read as markup.
            console.print(f"[yellow]{escape(str(missing))}[/]", highlight=False, soft_wrap=True)
        if result.bundle_dir is not None:
            console.print(f"bundle written to {result.bundle_dir} (report.json inside)", highlight=False)
        report_build_log(console, log_path)


def _check_task(task: str) -> str:
    """`--task` checked before anything heavy is imported."""
    from edgefleet.agent.core.quality_tasks import AUTO, TASKS
    from edgefleet.sdk.build.errors import BuildError

    name = (task or "").strip().lower()
    if name not in (*TASKS, AUTO):
        raise BuildError(f"--task {task!r} is not one of {', '.join((*TASKS, AUTO))}")
    return name


def _task_scope(task: str) -> Any:
    """Score the build's candidates and bundle as `task` (sdk/build/measure.py `task_scope`)."""
    from edgefleet.sdk.build.measure import task_scope

    return task_scope(task)


def _build() -> Any:
    """`build` itself, imported only once the arguments are known to be usable (it loads numpy and more)."""
    from edgefleet.sdk.build.builder import build

    return build


def _build_release(
    console: Any,
    model: Path,
    profiles: list[str],
    out: Path,
    version: Optional[int],
    force: bool,
    options: dict[str, Any],
    log_path: Any,
    as_json: bool,
) -> None:
    """Build one release for several profiles into OUT/<profile>/ and print one table per profile."""
    from edgefleet.sdk.build.release import build_release

    with library_output_to(log_path):
        results = _run_with_progress(
            console,
            lambda progress: build_release(
                model, profiles, out, version=version, overwrite=force, progress=progress, **options
            ),
            quiet=as_json,
        )
    if as_json:
        report_build_log(console, log_path)
        typer.echo(
            json.dumps({p: {**r.report, "bundle": str(r.bundle_dir)} for p, r in results.items()}, indent=2)
        )
        return
    for index, (pname, result) in enumerate(results.items()):
        print_table(candidates_table(result.report), console)
        if index == 0:  # one model, one table: the profiles share it
            print_sensitivity(result.report, console)
        console.print(
            f"[bold]{pname}:[/] {result.chosen.id} — {result.reason}", highlight=False, soft_wrap=True
        )
    first = next(iter(results.values()))
    version_text = first.report.get("version")
    console.print(
        f"release {options['name']}{f' version {version_text}' if version_text else ''} written to {out}/"
        f"<profile>/ for {', '.join(results)}; `edgefleet deploy {out}` gives each device its profile's bundle",
        highlight=False,
        soft_wrap=True,
    )
    report_build_log(console, log_path)


def _safe_name(stem: str) -> str:
    """A manifest-safe model name from a file stem (letters, digits, '.', '_', '-')."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "-" for c in stem).strip("-._")
    return cleaned[:128] or "model"


def _run_with_progress(console: Any, work: Any, quiet: bool) -> Any:
    """Run `work(progress)` under a rich progress bar (no bar with --json)."""
    if quiet:
        import contextlib
        import sys

        # Libraries print progress to stdout; with --json, stdout must hold the JSON document alone.
        with contextlib.redirect_stdout(sys.stderr):
            return work(None)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        redirect_stderr=False,  # stderr goes to the build log (library_output_to), not above the bar
        disable=not console.is_terminal,  # a pipe or a file gets the results, not bar frames
    ) as bar:
        task = bar.add_task("building", total=1.0)
        step = bar.add_task("", total=1.0, visible=False)
        overall = {"value": 0.0}

        def progress(message: str, fraction: float) -> None:
            # Candidate-level messages move the top bar; a step's own (distillation epochs, calibration,
            # sensitivity) move the second one, which restarts with each candidate.
            if message.startswith("candidate ") or message.startswith("measured"):
                overall["value"] = fraction
                bar.update(task, completed=fraction, description=message[:60])
                bar.update(step, completed=0.0, description="", visible=False)
                return
            bar.update(
                step, completed=max(0.0, min(1.0, fraction)), description=f"  {message[:58]}", visible=True
            )

        return work(progress)
