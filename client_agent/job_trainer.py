"""A job's client-side trainer: the client parts (front + back) with their adapters and defences, and its
checkpoint (adapters, optimizer and scheduler state)."""

from __future__ import annotations

import logging

from client_agent.state import JobCheckpoint, RoundPosition
from flglm import protocol
from flglm.adapters import AdapterSpec, load_trainable_state_dict, trainable_state_dict
from flglm.agent_step import client_parts
from flglm.contracts.job_settings import Hyperparameters
from flglm.models import load_split_parts
from flglm.privacy.client import ClientDefence, add_client_adapters
from flglm.split import SplitPlan
from flglm.trainers import ClientSideTrainer

log = logging.getLogger("flglm.agent")


def describe_defence(defence: ClientDefence) -> str:
    """The defences in force, for the log (the settings' numbers, never anything private)."""
    parts = []
    if defence.activation.active:
        parts.append(
            f"h0 clipped to {defence.activation.clip_norm:.4g} per token, noise std "
            f"{defence.activation.noise_std:.4g} (ε = {defence.activation.epsilon():.3g} per vector, "
            "δ = 1e-5)"
        )
    if defence.gradient_noise > 0:
        parts.append(f"dL/dh1 noise {defence.gradient_noise:g} x RMS")
    if defence.private_front:
        parts.append(f"private input block (decorrelation λ = {defence.decorrelation:g})")
    return "; ".join(parts)


def build_trainer(
    job: protocol.AgentJobView,
    hp: Hyperparameters,
    privacy: protocol.PrivacySpec,
    checkpoint: JobCheckpoint,
) -> ClientSideTrainer:
    """Load only the client parts and add the job's adapters (a private input block from this owner's
    persisted seed) and defences (the clip's reference norm on the public input block)."""
    plan = SplitPlan(job.split_plan.get("front_layers", 1), job.split_plan.get("back_layers", 1))
    split = load_split_parts(job.model_ref, plan, parts={"front", "back"})
    private_seed = checkpoint.private_seed() if privacy.private_front else None
    add_client_adapters(
        split,
        AdapterSpec.model_validate(job.adapter),
        hp.seed,
        private_seed,
        privacy.private_init_scale,
    )
    defence = ClientDefence.from_spec(privacy, split.part("front"))
    # Recomputing the input block at backward keeps its activations out of the step's peak, which is held
    # while the server works: the agent's peak resident memory is what its owner must provide.
    trainer = ClientSideTrainer(
        split, hp.train_config(), defence if defence.active else None, recompute_front=True
    )
    if defence.active:
        log.info("job %d: defences: %s", job.job_id, describe_defence(defence))
    return trainer


def optimizer_state(trainer: ClientSideTrainer) -> dict[str, object]:
    optimizer = trainer.optimizer
    if optimizer.optimizer is None or optimizer.scheduler is None:
        return {}
    return {"optimizer": optimizer.optimizer.state_dict(), "scheduler": optimizer.scheduler.state_dict()}


def restore_trainer(trainer: ClientSideTrainer, checkpoint: JobCheckpoint) -> None:
    """Load the checkpoint's client adapters, optimizer and scheduler state into the trainer."""
    load_trainable_state_dict(client_parts(trainer), checkpoint.load_adapters())
    state = checkpoint.load_optimizer_state()
    optimizer = trainer.optimizer
    if state and optimizer.optimizer is not None and optimizer.scheduler is not None:
        optimizer.optimizer.load_state_dict(state["optimizer"])
        optimizer.scheduler.load_state_dict(state["scheduler"])


def save_trainer(trainer: ClientSideTrainer, checkpoint: JobCheckpoint, position: RoundPosition) -> None:
    """Checkpoint the position with the client adapters, optimizer and scheduler state."""
    checkpoint.save(position, trainable_state_dict(client_parts(trainer)), optimizer_state(trainer))
