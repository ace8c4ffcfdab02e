"""`edgefleet federate BUNDLE --to SELECTOR --rounds R ... -o OUT`: federated fine-tuning of a model's head."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from edgefleet.sdk.cli.errors import fail as _err
from edgefleet.sdk.cli.fleet import _BROKER, _CA, _CERT, _DB, _FLEET, _JSON, _KEY, _PASSWORD, _USER, _open


def register(app: typer.Typer) -> None:
    """Attach the `federate` command."""

    @app.command("federate")
    def federate(
        bundle: Path = typer.Argument(..., help="The bundle the devices serve (folder or .tar)."),
        to: str = typer.Option("all", "--to", help="Devices: a device id, tag:NAME, profile:NAME or all."),
        out: Path = typer.Option(
            ..., "-o", "--out", help="Folder of the new bundle (same name, next version)."
        ),
        rounds: int = typer.Option(10, "--rounds", help="Federated rounds."),
        clients_per_round: Optional[int] = typer.Option(
            None, "--clients-per-round", help="Devices per round (default: every eligible one)."
        ),
        local_epochs: int = typer.Option(
            1, "--local-epochs", help="Epochs over its local data each device trains per round."
        ),
        lr: float = typer.Option(0.1, "--lr", help="Local learning rate."),
        batch: int = typer.Option(32, "--batch", help="Local batch size (the expected batch under DP)."),
        mu: float = typer.Option(0.0, "--mu", help="FedProx proximal term (0: plain FedAvg)."),
        min_clients: int = typer.Option(2, "--min-clients", help="Good updates a round needs to count."),
        round_timeout: float = typer.Option(
            60.0, "--round-timeout", help="Seconds a round waits; later devices are dropouts."
        ),
        max_update_norm: float = typer.Option(
            100.0, "--max-update-norm", help="Updates with a larger L2 norm are refused."
        ),
        eval_path: Optional[Path] = typer.Option(
            None,
            "--eval",
            help="eval.npz (x, y) for the host-side accuracy per round (default: the bundle's).",
        ),
        dp_epsilon: Optional[float] = typer.Option(
            None, "--dp-epsilon", help="Differential privacy: the ε to spend in all (with --dp-delta)."
        ),
        dp_delta: float = typer.Option(1e-5, "--dp-delta", help="Differential privacy δ."),
        dp_noise: Optional[float] = typer.Option(
            None, "--dp-noise", help="DP noise multiplier σ (instead of --dp-epsilon)."
        ),
        dp_clip: float = typer.Option(
            1.0, "--dp-clip", help="DP clipping norm C (per example; per update at device level)."
        ),
        dp_level: str = typer.Option(
            "record",
            "--dp-level",
            help="record (DP-SGD on each device) or device (clip updates, noise the sum).",
        ),
        dp_min_samples: int = typer.Option(
            50,
            "--dp-min-samples",
            help="Record-level DP: least examples a device must hold (the noise is calibrated for it).",
        ),
        secure_agg: bool = typer.Option(False, "--secure-agg", help="Secure aggregation (SecAgg+)."),
        head: Optional[str] = typer.Option(
            None, "--head", help="The head's weight and bias tensors, W,B (default: the last linear layer)."
        ),
        prepare: bool = typer.Option(
            False, "--prepare", help="Only write the federation-ready bundle (features exposed) to -o."
        ),
        deploy: Optional[str] = typer.Option(
            None, "--deploy", help="Roll the result out with this strategy (all, canary:PCT, waves:...)."
        ),
        sign_key: Optional[Path] = typer.Option(
            None, "--key", help="Signing key (default: the fleet key from `edgefleet keys init`)."
        ),
        trusted_key: list[Path] = typer.Option(
            [], "--trusted-key", help="Public key(s) the bundle must be signed with."
        ),
        seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the client selection."),
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
        """Train the model's head on the devices' own data (it never leaves them) → a new signed bundle."""
        from edgefleet.sdk.errors import EdgefleetError
        from edgefleet.sdk.federated.run import FederateSettings
        from edgefleet.sdk.federated.run import federate as run_federate
        from edgefleet.sdk.federated.run import prepare as run_prepare

        heads = [h for h in head.split(",") if h] if head else None
        client = _open(broker, db, fleet, username, password, tls_ca, tls_cert, tls_key, list(trusted_key))
        try:
            if prepare:
                path = run_prepare(client, bundle, out, key=sign_key, head=heads)
                typer.echo(
                    json.dumps({"bundle": str(path)}) if as_json else f"federation-ready bundle: {path}"
                )
                return
            settings = FederateSettings(
                rounds=rounds,
                clients_per_round=clients_per_round,
                local_epochs=local_epochs,
                lr=lr,
                batch=batch,
                mu=mu,
                min_clients=min_clients,
                round_timeout_s=round_timeout,
                max_update_norm=max_update_norm,
                dp_epsilon=dp_epsilon,
                dp_delta=dp_delta,
                dp_noise=dp_noise,
                dp_clip=dp_clip,
                dp_level=dp_level,
                dp_min_samples=dp_min_samples,
                secure_agg=secure_agg,
                seed=seed,
            )
            report = run_federate(
                client,
                bundle,
                to,
                out,
                settings,
                key=sign_key,
                head=heads,
                eval_path=eval_path,
                deploy=deploy,
                on_round=None if as_json else (lambda r: typer.echo(r.line(rounds))),
            )
        except EdgefleetError as exc:
            raise _err(str(exc)) from None
        finally:
            client.close()
        if as_json:
            typer.echo(json.dumps(report, indent=2, sort_keys=True, default=str))
            return
        privacy = report.get("privacy")
        spent = (
            ""
            if not privacy
            else f", ε {privacy['epsilon']} at δ {privacy['delta']} ({privacy['level']} level)"
        )
        typer.echo(
            f"bundle {report['bundle']}: {report['model']['name']} v{report['model']['version']}, accuracy {report['accuracy']}{spent}"
        )
        if report.get("rollout"):
            typer.echo(f"rollout {report['rollout']['id']}: {report['rollout']['status']}")
