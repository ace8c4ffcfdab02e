"""`edgefleet finetune MODEL --data labelled.npz --task T --train head|last:N|full --epochs N --out FILE`.

Trains a TorchScript (.pt) or torch.export (.pt2) model on the user's labelled data with the task's
loss (edgefleet.sdk.compress.transfer.finetune_model) and saves it in the same format (or the one
--out's suffix names), ready for `edgefleet build`. The .npz holds one array per model input, named
like the inputs (or `x` for a single input), and the labels: `y` (class ids; CTC token ids [N, S]
padded with 0, with optional `y_lengths`; embedding targets [N, D]) or, for detection, one target per
raw model output `y_0`, `y_1`, … A progress bar runs on a terminal; a pipe gets one line per epoch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from edgefleet.sdk.cli.errors import fail as _fail

if TYPE_CHECKING:
    import numpy as np

TASK_HELP = "classification, detection, ctc or embedding (decides the loss and the metric)."


def input_names(loaded: Any) -> list[str]:
    """The model's input names in argument order (TorchScript schema, torch.export signature)."""
    if loaded.inputs:
        return [spec.name for spec in loaded.inputs]
    forward = getattr(loaded.model, "forward", None)
    schema = getattr(forward, "schema", None)
    if schema is not None:
        return [arg.name for arg in schema.arguments[1:]]
    import inspect

    return [p.name for p in inspect.signature(loaded.model.forward).parameters.values()]


def read_data(path: Path, names: list[str], role: str) -> tuple[dict[str, np.ndarray], Any]:
    """(inputs in the model's order, targets) from an .npz; labels are `y` and `y_*` arrays."""
    import numpy as np

    from edgefleet.sdk.build.errors import DataError
    from edgefleet.sdk.compress.distill import split_data

    if not path.is_file():
        raise DataError(f"{role} file {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except Exception as exc:  # BadZipFile, ValueError (pickled objects), OSError
        raise DataError(
            f"{role} file {path} is not a readable .npz ({exc}); save it with numpy.savez"
        ) from exc
    inputs, targets = split_data(arrays)
    assert isinstance(inputs, dict)
    if targets is None:
        raise DataError(f"{role} file {path} has no labels: save them as 'y' (detection: y_0, y_1, …)")
    if names and all(name in inputs for name in names):
        return {name: inputs[name] for name in names}, targets
    if len(inputs) == 1 and len(names) <= 1:
        return dict(inputs), targets
    raise DataError(
        f"the {role} arrays {sorted(inputs)} do not match the model's inputs {names}: save one array per "
        "input under its name (or 'x' for a single input)"
    )


def trainable_module(loaded: Any) -> Any:
    """The torch module to train: TorchScript as loaded, a torch.export program's module()."""
    from edgefleet.sdk.build.errors import ModelLoadError

    if loaded.stage != "torch":
        raise ModelLoadError(
            f"fine-tuning needs a torch model (TorchScript .pt or torch.export .pt2), not {loaded.kind}: "
            "fine-tune before converting"
        )
    if loaded.kind == "exported":
        if loaded.static_batch is not None:
            raise ModelLoadError(
                f"the .pt2 was exported with a fixed batch of {loaded.static_batch}: export it with a dynamic "
                "batch (dynamic_shapes) to fine-tune it"
            )
        return loaded.model.module()
    return loaded.model


def save_model(module: Any, out: Path, example: dict[str, np.ndarray]) -> Path:
    """Write the trained module as TorchScript (.pt, …) or torch.export (.pt2), by --out's suffix."""
    import torch

    from edgefleet.sdk.compress.tasks import as_batch
    from edgefleet.sdk.errors import EdgefleetError

    args = as_batch({k: v[:2] for k, v in example.items()}).tensors
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if out.suffix == ".pt2":
            batch = torch.export.Dim("batch")
            program = torch.export.export(module, args, dynamic_shapes=tuple({0: batch} for _ in args))
            torch.export.save(program, str(out))
            return out
        scripted = module if isinstance(module, torch.jit.ScriptModule) else torch.jit.trace(module, args)
        torch.jit.save(scripted, str(out))
    except Exception as exc:  # torch.export / jit raise many types for untraceable code
        raise EdgefleetError(
            f"the trained model could not be saved as {out.suffix} ({str(exc).strip()[:200]}); try the other "
            "format (--out model.pt for TorchScript, model.pt2 for torch.export)"
        ) from exc
    return out


def _progress(console: Any, epochs: int, metric: str) -> tuple[Any, Any, Any]:
    """(context manager, on_epoch, on_batch): a rich bar on a terminal, one plain line per epoch elsewhere."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    task = bar.add_task("fine-tuning", total=None)

    def on_batch(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    def on_epoch(epoch: int, loss: float, score: float) -> None:
        line = f"epoch {epoch}/{epochs}  train loss {loss:.4f}  val {metric} {abs(score):.4f}"
        if console.is_terminal:
            bar.update(task, description=line)
        else:
            console.print(line, highlight=False)

    return bar, on_epoch, on_batch


def register(app: typer.Typer) -> None:
    """Attach the `finetune` command."""

    @app.command("finetune")
    def finetune(
        model: Path = typer.Argument(
            ...,
            help="TorchScript .pt, torch.export .pt2, or MODEL.py:NAME (your script's nn.Module) to train.",
        ),
        data: Path = typer.Option(
            ..., "--data", help=".npz: one array per model input (or 'x') and labels 'y'."
        ),
        out: Path = typer.Option(..., "--out", "-o", help="Where to write the trained model (.pt or .pt2)."),
        task: str = typer.Option("classification", "--task", help=TASK_HELP),
        train: str = typer.Option("head", "--train", help="head, last:N (the last N layers) or full."),
        epochs: int = typer.Option(10, "--epochs", help="Most epochs (early stopping may end sooner)."),
        val: Optional[Path] = typer.Option(
            None, "--val", help="Validation .npz (default: the training data)."
        ),
        num_classes: Optional[int] = typer.Option(
            None, "--num-classes", help="Replace the classification head with one of this many classes."
        ),
        lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate."),
        batch_size: int = typer.Option(64, "--batch-size", help="Samples per step."),
        patience: int = typer.Option(5, "--patience", help="Stop after this many epochs without progress."),
        force: bool = typer.Option(False, "--force", help="Replace an existing --out file."),
        as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Fine-tune MODEL on labelled data: its head, its last N layers, or all of it."""
        from rich.console import Console

        from edgefleet.sdk.build.model_io import load_model
        from edgefleet.sdk.compress.tasks import check_task, metric_name
        from edgefleet.sdk.compress.transfer import finetune_model, parse_train
        from edgefleet.sdk.errors import EdgefleetError

        console = Console(stderr=as_json)
        try:
            check_task(task)
            parse_train(train)
            if out.exists() and not force:
                raise EdgefleetError(f"{out} exists; pass --force to replace it")
            loaded = load_model(model)
            module = trainable_module(loaded)
            names = input_names(loaded)
            x, y = read_data(data, names, "training")
            x_val, y_val = read_data(val, names, "validation") if val is not None else (None, None)
            bar, on_epoch, on_batch = _progress(console, epochs, metric_name(task, True))
            with bar:
                result = finetune_model(
                    module,
                    x,
                    y,
                    task=task,
                    train=train,
                    num_classes=num_classes,
                    x_val=x_val,
                    y_val=y_val,
                    epochs=epochs,
                    lr=lr,
                    batch_size=batch_size,
                    patience=patience,
                    on_epoch=on_epoch,
                    on_batch=on_batch,
                )
            saved = save_model(result.model, out, x)
        except EdgefleetError as exc:
            raise _fail(str(exc)) from None
        summary = {**result.summary(), "task": task, "train": train, "out": str(saved)}
        if as_json:
            typer.echo(json.dumps(summary, indent=2))
            return
        console.print(
            f"trained {len(result.trained_layers)} layers ({result.trainable_params:,} parameters, "
            f"{result.frozen_params:,} frozen) for {result.epochs_run} epochs: {result.metric} "
            f"{result.initial_value:.4f} → {result.value:.4f}",
            highlight=False,
        )
        console.print(f"saved {saved}", highlight=False)
