"""The centralized reference: the same model, adapters and schedule on the union of the clients' data.

Step budget (what "the same" means here): the federated job runs R rounds of S steps; at every step each of
the C clients trains on a batch of b examples, and in client_batch mode the server's body takes one optimizer
step on the concatenated C·b rows. The centralized run therefore takes R·S optimizer steps of batch C·b drawn
from the union: the same examples seen, the same number of updates and the same warm-up/decay schedule for
every adapter (the alternative, C·R·S steps of batch b, would give it C times more updates than any federated
adapter gets). Adapters start from the same seeded init as the split job's (`add_split_adapters`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.data import Example, collate, iterate_batches, tokenize_examples
from flglm.models import load_model, load_tokenizer
from flglm.split import SplitPlan, split_model
from flglm.trainers import CentralizedTrainer, TrainConfig


@dataclass
class CentralizedRun:
    """The trained model (adapters in place), its per-step losses and the training wall time."""

    model: nn.Module
    losses: list[float] = field(default_factory=list)
    wall_s: float = 0.0


def adapted_base_model(model_ref: str, plan: SplitPlan, adapter_cfg: AdapterSpec, seed: int) -> nn.Module:
    """The unsplit model with the split job's initial adapters (same seeds per part)."""
    model = load_model(model_ref)
    add_split_adapters(split_model(model, plan), adapter_cfg, seed)  # the parts share the model's modules
    return model


def train_centralized(
    model_ref: str,
    plan: SplitPlan,
    adapter_cfg: AdapterSpec,
    train_cfg: TrainConfig,
    examples: Sequence[Example],
    steps: int,
    batch_size: int,
    max_seq_len: int,
    seed: int,
    on_step: Callable[[int, float], None] | None = None,
) -> CentralizedRun:
    """Train `steps` optimizer steps of `batch_size` rows from `examples` (seeded epochs, like the agents)."""
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    tokenizer = load_tokenizer(model_ref)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    dataset = tokenize_examples(list(examples), tokenizer, max_seq_len)
    model = adapted_base_model(model_ref, plan, adapter_cfg, seed)
    trainer = CentralizedTrainer(model, train_cfg)
    run = CentralizedRun(model)
    started = time.monotonic()
    batches = iterate_batches(dataset, batch_size, seed)
    for step in range(steps):
        batch = collate(next(batches), int(pad))
        loss = trainer.train_step(batch)
        run.losses.append(loss)
        if on_step is not None:
            on_step(step, loss)
    run.wall_s = time.monotonic() - started
    model.eval()
    return run
