"""The privacy/utility frontier: each defence's accuracy on the demo task beside its audited token recovery.

Accuracy is measured on the demo's data and budget (same partition seed, the same 400 balanced held-out
examples, R·S steps of batch C·b on the pooled data, the same schedule): the split model trained and scored
*with the defence in its path* — h0 clipped and noised at the cut in training and in evaluation (the server
sees eval forwards too), dL/dh1 noised, the input block's adapters private and perturbed from step 0, the
decorrelation penalty in the client's loss — by forward hooks on the unsplit model, whose logits and
gradients equal the split model's. The undefended row is the demo's centralized reference, so a row's
accuracy minus it is the defence's cost; the federated cost on top is the demo's own table.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from apps.demo.scoring import score_labels
from flglm.adapters import AdapterSpec, trainable_parameters
from flglm.data import Example, collate, iterate_batches, tokenize_examples
from flglm.models import load_model, load_tokenizer
from flglm.privacy.client import ClientDefence, add_client_adapters
from flglm.privacy.report import ALL_ATTACKS, AttackName, AuditRequest
from flglm.protocol import PrivacySpec
from flglm.split import SplitPlan, find_decoder_layout, split_model
from flglm.trainers import (
    SideOptimizer,
    TrainConfig,
    causal_lm_loss,
    cpu_has_native_bf16,
    target_positions,
)


@dataclass(frozen=True)
class DefenceSetting:
    """One point of the frontier: a name, the input block's depth and the privacy settings."""

    name: str
    front_layers: int
    privacy: PrivacySpec


@dataclass
class DefendedModel:
    """The unsplit model with a defence on its cut; `penalty` holds the last forward's decorrelation term."""

    model: nn.Module
    defence: ClientDefence
    privacy: PrivacySpec
    penalty: torch.Tensor | None = None


def build_defended_model(
    model_ref: str, setting: DefenceSetting, adapter: AdapterSpec, seed: int, back_layers: int = 1
) -> tuple[DefendedModel, Callable[[], None]]:
    """Load the model with the job's adapters and hook the defence into its cuts; returns (model, unhook).

    The adapters and the defences are the agent's own (`add_client_adapters`, `ClientDefence`), so the
    frontier measures what an agent applies."""
    model = load_model(model_ref)
    split = split_model(model, SplitPlan(front_layers=setting.front_layers, back_layers=back_layers))
    privacy = setting.privacy
    private_seed = secrets.randbits(62) if privacy.private_front else None
    add_client_adapters(split, adapter, seed, private_seed, privacy.private_init_scale)
    front = split.part("front")
    defence = ClientDefence.from_spec(privacy, front)
    defended = DefendedModel(model, defence, privacy)
    layers = find_decoder_layout(model).layers
    cut_in, cut_out = layers[setting.front_layers - 1], layers[len(layers) - back_layers - 1]
    inputs: dict[str, torch.Tensor] = {}

    def keep_inputs(_module: nn.Module, _args: Any, kwargs: dict[str, Any]) -> None:
        inputs["input_ids"], inputs["attention_mask"] = kwargs["input_ids"], kwargs["attention_mask"]

    def defend_h0(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        if torch.is_grad_enabled():
            defended.penalty = defence.decorrelation_penalty(
                front, inputs["input_ids"], inputs["attention_mask"], hidden
            )
        hidden = defence.defend_h0(hidden)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def noise_gradient(_module: nn.Module, _inputs: Any, output: Any) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        if defence.gradient_noise > 0 and hidden.requires_grad:
            hidden.register_hook(defence.defend_grad_h1)

    handles = [
        model.register_forward_pre_hook(keep_inputs, with_kwargs=True),
        cut_in.register_forward_hook(defend_h0),
        cut_out.register_forward_hook(noise_gradient),
    ]

    def unhook() -> None:
        for handle in handles:
            handle.remove()

    return defended, unhook


@contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    model.train()
    try:
        yield
    finally:
        model.eval()


def train_and_score(
    model_ref: str,
    setting: DefenceSetting,
    train_examples: list[Example],
    eval_examples: list[Example],
    labels: list[str],
    steps: int,
    batch_size: int,
    train_cfg: TrainConfig,
    adapter: AdapterSpec,
    seed: int,
    max_seq_len: int,
    on_step: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Train the defended split model on the pooled data with the demo's budget and score it."""
    tokenizer = load_tokenizer(model_ref)
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    defended, unhook = build_defended_model(model_ref, setting, adapter, seed)
    model = defended.model
    optimizer = SideOptimizer(trainable_parameters(model), train_cfg)
    dataset = tokenize_examples(train_examples, tokenizer, max_seq_len)
    batches = iterate_batches(dataset, batch_size, seed)
    losses: list[float] = []
    started = time.monotonic()
    with _train_mode(model):
        for step in range(steps):
            batch = collate(next(batches), pad)
            positions = target_positions(batch["labels"])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=train_cfg.bf16_autocast):
                logits = model(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    use_cache=False,
                    logits_to_keep=positions,
                ).logits  # (batch, kept, vocab)
            loss = causal_lm_loss(logits, batch["labels"], positions)
            # The penalty is λ·dCor already (ClientDefence.decorrelation_penalty).
            (loss if defended.penalty is None else loss + defended.penalty).backward()
            optimizer.step()
            defended.penalty = None
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(step, losses[-1])
    train_wall_s = time.monotonic() - started
    scores = score_labels(
        model, tokenizer, eval_examples, labels, max_seq_len + 16, 16, train_cfg.bf16_autocast
    )
    unhook()
    return {
        "setting": setting.name,
        "front_layers": setting.front_layers,
        "privacy": setting.privacy.model_dump(),
        "seed": seed,
        "accuracy": scores.accuracy,
        "accuracy_ci": list(scores.interval),
        "eval_loss": scores.eval_loss,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "train_wall_s": train_wall_s,
        "epsilon": defended.defence.activation.epsilon() if defended.defence.activation.active else None,
    }


def demo_data(
    seed: int, work: Path, eval_per_label: int = 50, max_words: int = 45
) -> tuple[list[Example], list[Example], list[str]]:
    """The demo's pooled training examples, its held-out examples (400 by default) and labels for `seed`."""
    from apps.demo.pipeline import DemoOptions, prepare_data

    data = prepare_data(DemoOptions(seed=seed, eval_per_label=eval_per_label, max_words=max_words), work)
    assert data.labels is not None and data.eval_examples is not None
    train = [ex for part in data.clients.values() for ex in part]
    return train, list(data.eval_examples), list(data.labels)


# The settings of the README's frontier (docs/privacy.md): the plain split first (the baseline), then one
# point per defence at a strength where it starts to bite.
DEFAULT_SETTINGS: tuple[DefenceSetting, ...] = (
    DefenceSetting("plain split", 1, PrivacySpec(wire_dtype="bfloat16")),
    DefenceSetting("noise m=2", 1, PrivacySpec(wire_dtype="bfloat16", activation_noise=2.0)),
    DefenceSetting("gradient noise g=4", 1, PrivacySpec(wire_dtype="bfloat16", gradient_noise=4.0)),
    DefenceSetting("gradient noise g=16", 1, PrivacySpec(wire_dtype="bfloat16", gradient_noise=16.0)),
    DefenceSetting(
        "private front s=0.5",
        1,
        PrivacySpec(wire_dtype="bfloat16", private_front=True, private_init_scale=0.5),
    ),
    DefenceSetting(
        "private front, 4 layers, s=0.5",
        4,
        PrivacySpec(wire_dtype="bfloat16", private_front=True, private_init_scale=0.5),
    ),
)


def frontier_row(
    setting: DefenceSetting,
    seeds: list[int],
    work: Path,
    audit_sequences: int = 64,
    audit_seq_len: int = 64,
    model_ref: str = "smollm2-135m",
    progress: Callable[[str], None] | None = None,
    steps: int = 40,
    batch_size: int = 24,
    eval_per_label: int = 50,
    max_words: int = 45,
    attacks: list[AttackName] | None = None,
) -> dict[str, Any]:
    """One row: the audit of the setting (at step 0) and its accuracy on the demo task for each seed.

    The defaults are the demo's budget (5 rounds x 8 steps = 40 steps of 3 clients x 8 = 24 examples, 50 eval
    examples per label, 45 words per text); smaller values only make tests fast.
    """
    from flglm.privacy.audit import run_privacy_audit

    say = progress or (lambda _message: None)
    say(f"{setting.name}: auditing {audit_sequences} x {audit_seq_len} tokens")
    audit = run_privacy_audit(
        AuditRequest(
            model_ref=model_ref,
            split_plan={"front_layers": setting.front_layers, "back_layers": 1},  # type: ignore[arg-type]
            privacy=setting.privacy,
            sequences=audit_sequences,
            seq_len=audit_seq_len,
            attacks=list(attacks or ALL_ATTACKS),
        )
    )
    runs = []
    for seed in seeds:
        say(f"{setting.name}: training and scoring seed {seed}")
        train, eval_examples, labels = demo_data(seed, work / f"data-{seed}", eval_per_label, max_words)
        runs.append(
            train_and_score(
                model_ref,
                setting,
                train,
                eval_examples,
                labels,
                steps=steps,
                batch_size=batch_size,
                train_cfg=TrainConfig(
                    lr=1e-3,
                    warmup_steps=min(4, steps),
                    total_steps=steps,
                    bf16_autocast=cpu_has_native_bf16(),
                ),
                adapter=AdapterSpec(r=8, alpha=16),
                seed=seed,
                max_seq_len=96,
            )
        )
    return {
        "setting": setting.name,
        "front_layers": setting.front_layers,
        "privacy": setting.privacy.model_dump(),
        "audit": audit.model_dump(mode="json"),
        "runs": runs,
        "mean_accuracy": sum(r["accuracy"] for r in runs) / len(runs) if runs else None,
    }


def plot_frontier(
    rows: list[dict[str, Any]],
    baseline_accuracy: float,
    path: Path,
    title: str = "Privacy / utility frontier (SmolLM2-135M, news outlets)",
) -> Path:
    """Strongest attack's token recovery (x) against accuracy (y), one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        x = 100 * float(row["audit"]["strongest_token_recovery"] or 0.0)
        y = 100 * float(row["mean_accuracy"] or 0.0)
        axes.scatter([x], [y])
        axes.annotate(row["setting"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    axes.axhline(100 * baseline_accuracy - 2, linestyle="--", color="grey", linewidth=1)
    axes.axvline(20, linestyle="--", color="grey", linewidth=1)
    axes.text(21, 100 * baseline_accuracy - 1.8, "goal: < 20 % recovered, ≤ 2 points cost", fontsize=8)
    axes.set_xlabel("tokens recovered by the strongest attack (%)")
    axes.set_ylabel("demo task accuracy (%)")
    axes.set_xlim(-2, 102)
    axes.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
