"""`edgefleet federate` end to end: bundle → task → rounds over MQTT → new signed bundle (→ rollout).

`Fleet.federate` and the CLI both call `federate` here. The source bundle is verified with the fleet's
trusted keys first; devices are the ones the selector picks that serve that bundle's model; the result
is a bundle of the same name and the next version whose report.json holds every round and the privacy
spent (ε and δ also go into the manifest's `federated` entry); `deploy` hands it to a rollout with the
usual quality gates.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from edgefleet.sdk.federated.server import FederateSettings, RoundReport, RoundServer
from edgefleet.sdk.federated.task import FederatedError, load_task


def _key(path: str | Path | None) -> Any:
    from edgefleet.sdk.trust.keys import load_private_key

    return load_private_key(path)


def prepare(
    fleet: Any,
    bundle: str | Path,
    out: str | Path,
    *,
    key: str | Path | None = None,
    head: Sequence[str] | None = None,
) -> Path:
    """Write the federation-ready bundle of `bundle` (its model also outputs its features) to `out`."""
    from edgefleet.sdk.federated.result import prepare_bundle
    from edgefleet.sdk.trust.bundle import load_bundle, verify_bundle

    with load_bundle(bundle) as source:
        verify_bundle(source, fleet.trusted_keys or None)
        return prepare_bundle(
            Path(source), Path(out), private_key=_key(key), head=list(head) if head else None
        )


def federate(
    fleet: Any,
    bundle: str | Path,
    to: str,
    out: str | Path,
    settings: FederateSettings,
    *,
    key: str | Path | None = None,
    head: Sequence[str] | None = None,
    eval_path: str | Path | None = None,
    deploy: str | None = None,
    task_id: str | None = None,
    on_round: Callable[[RoundReport], None] | None = None,
    on_sent: Callable[[int, list[str]], None] | None = None,
) -> dict[str, Any]:
    """Run a federated task on the devices `to` selects; returns the report (also in OUT/report.json)."""
    from edgefleet.sdk.federated.result import result_bundle
    from edgefleet.sdk.fleet.selectors import parse_selector
    from edgefleet.sdk.store import federated as fed_store
    from edgefleet.sdk.trust.bundle import load_bundle, verify_bundle

    settings.check()
    selector = parse_selector(to)
    private_key = _key(key)
    with load_bundle(bundle) as source:
        verify_bundle(source, fleet.trusted_keys or None)
        task = load_task(Path(source), head=head, eval_path=Path(eval_path) if eval_path else None)

        def devices() -> list[dict[str, Any]]:
            return [d for d in fleet.devices(refresh=True) if selector.matches(d)]

        def each_round(report: RoundReport) -> None:
            fed_store.record_round(fleet.store, server.task_id, report.to_dict())
            if on_round is not None:
                on_round(report)

        server = RoundServer(
            fleet.options,
            fleet.fleet,
            task,
            private_key,
            settings,
            devices,
            task_id=task_id,
            on_round=each_round,
            on_sent=on_sent,
        )
        fed_store.start_task(
            fleet.store,
            server.task_id,
            fleet.fleet,
            task.name,
            task.version,
            settings.rounds,
            asdict(settings),
        )
        try:
            outcome = server.run()
        except Exception as exc:
            fed_store.end_task(fleet.store, server.task_id, "failed", error=str(exc))
            raise
        privacy = outcome.privacy
        final = outcome.rounds[-1].accuracy if outcome.rounds else None
        report: dict[str, Any] = {
            "task": outcome.task_id,
            "model": {"name": task.name, "from_version": task.version, "version": task.version + 1},
            "selector": str(selector),
            "settings": asdict(settings),
            "rounds": [r.to_dict() for r in outcome.rounds],
            "baseline_accuracy": outcome.baseline_accuracy,
            "accuracy": final,
            "privacy": privacy,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        federated = {
            "task": outcome.task_id,
            "from_version": task.version,
            "rounds": len(outcome.rounds),
            "participants": sorted({d for r in outcome.rounds for d in r.participants}),
            "accuracy": final,
            "privacy": None
            if privacy is None
            else {"level": privacy["level"], "epsilon": privacy["epsilon"], "delta": privacy["delta"]},
        }
        out_dir = result_bundle(
            task,
            outcome.weight,
            outcome.bias,
            Path(out),
            private_key=private_key,
            report=report,
            federated=federated,
        )
    eps = privacy.get("epsilon") if privacy else None
    fed_store.end_task(
        fleet.store,
        outcome.task_id,
        "succeeded",
        epsilon=eps if isinstance(eps, (int, float)) else None,
        delta=privacy.get("delta") if privacy else None,
        result_version=task.version + 1,
    )
    report["bundle"] = str(out_dir)
    if deploy:
        handle = fleet.deploy(out_dir, to, strategy=deploy)
        report["rollout"] = {"id": handle.id, "status": str(handle.status)}
    return report


__all__ = ["FederateSettings", "FederatedError", "federate", "prepare"]
