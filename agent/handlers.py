"""The agent's answers to host commands other than deploy: rotate-root, infer over MQTT, rollback.

Each takes the running `Agent` and answers with a Result event; a refusal raises an AgentError, which
the agent's dispatch turns into an Error event carrying its code.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edgefleet.agent.core.errors import InstallError, ProtocolError
from edgefleet.agent.core.protocol import (
    Code,
    InferCommand,
    Result,
    RollbackCommand,
    RotateRootCommand,
    decode_array,
    encode_array,
)
from edgefleet.agent.support import jsonable, result_dict

if TYPE_CHECKING:
    from edgefleet.agent.daemon import Agent

log = logging.getLogger("edgefleet.agent")


def rotate_root(agent: Agent, cmd: RotateRootCommand) -> None:
    """Apply a key rotation; a refused one raises VerifyError, which becomes an Error event with its code."""
    if agent._install_thread is not None and agent._install_thread.is_alive():
        # The install verifies with the trust store; swapping keys under it would mix two roots.
        raise ProtocolError(Code.BUSY, f"an install is running; resend rotation {cmd.id!r} after it ends")
    from edgefleet.agent.core.manifest import canonical_bytes

    applied = cmd.root != canonical_bytes(agent.trust.root)
    if applied:
        # Nothing changes on a refusal: apply_root checks everything before it replaces the root.
        agent.trust.apply_root(cmd.root, {"signatures": [dict(s) for s in cmd.signatures]})
        log.info("trusting fleet root version %d: keys %s", agent.trust.version, agent.trust.keyids)
    # else: a QoS 1 redelivery or a re-push of the root already in force: answer, change nothing.
    agent._send(
        Result,
        ref=cmd.id,
        command=cmd.TYPE,
        data={
            "applied": applied,
            "root_version": int(agent.trust.version),
            "keyids": list(agent.trust.keyids),
            "threshold": int(agent.trust.threshold),
            "bundle_threshold": int(agent.trust.bundle_threshold),
        },
    )
    agent._publish_state()


def infer(agent: Agent, cmd: InferCommand) -> None:
    """Run an inference sent over MQTT (only with --mqtt-infer) and answer with its outputs."""
    if not agent.config.mqtt_infer:
        raise ProtocolError(
            Code.INFER_DISABLED,
            "infer over MQTT is off on this device: start the agent with --mqtt-infer",
        )
    inputs = {name: decode_array(spec) for name, spec in cmd.inputs.items()}
    result = agent.infer(inputs, request_id=cmd.id)
    agent._send(
        Result,
        ref=cmd.id,
        command=cmd.TYPE,
        data={
            "outputs": {k: encode_array(v) for k, v in result.outputs.items()},
            "model": result.model_name,
            "version": result.model_version,
            "latency_ms": result.latency_ms,
        },
    )


def rollback(agent: Agent, cmd: RollbackCommand) -> None:
    """Switch back to the previous slot's model; a refusal becomes an Error event naming the step."""
    if agent._install_thread is not None and agent._install_thread.is_alive():
        raise ProtocolError(Code.BUSY, "an install is running; send the rollback after it ends")
    try:
        # `abandon`: a first install rolled back is dropped (the installer stops serving it).
        result = agent.installer.rollback(cmd.abandon) if cmd.abandon else agent.installer.rollback()
    except InstallError as exc:
        agent._error(exc.code, f"rollback failed at step {exc.step!r}: {exc.reason}", cmd.id)
        return
    agent._send(Result, ref=cmd.id, command=cmd.TYPE, data=jsonable(result_dict(result)))
    agent._publish_state()
