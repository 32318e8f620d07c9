"""Local trainers: the centralized reference and the FL-GLM split step, split into client and server sides.

The split step is front fwd → body fwd → back fwd + loss → back bwd → body bwd → front bwd, then one
optimizer step per side. `ClientSideTrainer` and `ServerSideTrainer` are exactly what the networked agent and
worker run; `SplitTrainer` wires them together in-process. Both sides use the same AdamW settings and
schedule as `CentralizedTrainer`; AdamW updates each parameter independently, so one optimizer over all
parameters equals one optimizer per side and the losses match step for step.

A `ClientDefence` (flglm.privacy.client) makes the client side defend what it sends: h0 is clipped and noised
inside the graph (so the front's backward goes through the clip), dL/dh1 gets its noise after the back's
backward, and a NoPeek penalty joins the server's dL/dh0 in the front's backward. Without one (the default)
every trainer computes exactly the undefended step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedTokenizerBase

from flglm.adapters import trainable_parameters
from flglm.contracts.job_settings import TrainConfig as TrainConfig
from flglm.contracts.refusals import StepGraphMissing
from flglm.data.tokens import IGNORE_INDEX as IGNORE_INDEX
from flglm.data.tokens import target_positions as target_positions
from flglm.data.tokens import target_token_mask
from flglm.privacy.client import ClientDefence
from flglm.split import ServerBody, SplitModel, position_ids_from_attention_mask

LMBatch = Mapping[str, torch.Tensor]  # input_ids, attention_mask, labels: each (batch, seq)


def causal_lm_loss(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over labels != -100 (HF shift convention).

    `logits` is (batch, seq, vocab), or (batch, kept, vocab) when computed only at `positions`, or
    (n_kept, vocab) when `positions` is a (batch, seq) mask (`target_token_mask`).
    """
    if positions is None:
        logits, targets = logits[:, :-1, :], labels[:, 1:]  # (batch, seq-1, vocab), (batch, seq-1)
    elif positions.dtype == torch.bool:
        targets = labels[:, 1:][positions[:, :-1]]  # (n_kept,)
    else:
        targets = labels[:, positions + 1]  # (batch, kept)
    if not bool((targets != IGNORE_INDEX).any()):
        raise ValueError("batch has no target tokens (every label is -100): the loss is undefined")
    vocab = logits.shape[-1]
    return F.cross_entropy(logits.float().reshape(-1, vocab), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def tokenize_lm_batch(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int, padding_side: str = "right"
) -> dict[str, torch.Tensor]:
    """Token ids, mask and labels (padding → -100) for plain language-model training on `texts`."""
    tokenizer.padding_side = padding_side
    encoded = tokenizer(
        list(texts), max_length=max_length, truncation=True, padding="longest", return_tensors="pt"
    )
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, IGNORE_INDEX)
    return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"], "labels": labels}


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.total_steps is None:
        return 1.0
    return max(0.0, (cfg.total_steps - step) / max(1, cfg.total_steps - cfg.warmup_steps))


class SideOptimizer:
    """AdamW + warm-up/linear-decay schedule over one side's trainable parameters (none → no-op)."""

    def __init__(self, params: Sequence[nn.Parameter], cfg: TrainConfig) -> None:
        self.params = list(params)
        self.optimizer: torch.optim.AdamW | None = None
        self.scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        if self.params:
            self.optimizer = torch.optim.AdamW(
                self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
            )
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: _lr_factor(s, cfg))

    def step(self) -> None:
        if self.optimizer is not None and self.scheduler is not None:
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX).

    Where it does, CPU bf16 autocast made a SmolLM2 step about 1.7x faster; on an AVX2-only CPU the same
    matmul is emulated: a (384, 576) x (576, 1536) forward and backward took 0.11 s against 0.023 s in
    float32 on one thread.
    """
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def _autocast(cfg: TrainConfig, device: torch.device) -> AbstractContextManager[object]:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16_autocast)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """Dtype of the module's floating weights: activations from the wire (maybe bf16) are cast to it."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


class ClientSideTrainer:
    """A data owner's side: front + back, the loss, and their optimizer. Labels never leave this object."""

    def __init__(
        self,
        split: SplitModel,
        cfg: TrainConfig,
        defence: ClientDefence | None = None,
        recompute_front: bool = False,
    ) -> None:
        """`recompute_front` keeps only the input block's inputs while the server and the output block work,
        and runs the block again in `backward_front` (same values and dropout masks): one block's forward more
        per step for a lower peak (an agent's choice; see `client_agent.job_trainer`)."""
        self.front, self.back, self.cfg, self.defence = split.part("front"), split.part("back"), cfg, defence
        self.recompute_front = recompute_front
        parts = split.as_module_dict(["front", "back"]).train()
        self.optimizer = SideOptimizer(trainable_parameters(parts), cfg)
        self._dtype = _compute_dtype(self.back)
        self._h0: torch.Tensor | None = None
        self._penalty: torch.Tensor | None = None
        self._h1: torch.Tensor | None = None
        self._loss: torch.Tensor | None = None
        self.last_decorrelation: float | None = None  # λ·dCor of the last training forward, when on

    def forward_front(self, batch: LMBatch) -> torch.Tensor:
        """Run the input block and the defences; returns a detached copy of h0 to send, keeping the graph."""
        with _autocast(self.cfg, batch["input_ids"].device):
            if self.recompute_front:
                h0 = checkpoint(self.front, batch["input_ids"], batch["attention_mask"], use_reentrant=False)
            else:
                h0 = self.front(batch["input_ids"], batch["attention_mask"])  # (batch, seq, hidden)
        self._penalty = None
        if self.defence is not None:
            # Outside autocast: the penalty's distances and the clip's norms want float32.
            self._penalty = self.defence.decorrelation_penalty(
                self.front, batch["input_ids"], batch["attention_mask"], h0
            )
            self.last_decorrelation = None if self._penalty is None else float(self._penalty.detach())
            h0 = self.defence.defend_h0(h0)  # (batch, seq, hidden), still in the graph
        self._h0 = h0
        return h0.detach().clone()

    def eval_front(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """h0 of a forward-only pass (the caller sets no_grad/eval), defended like a training h0: every h0
        that leaves this process gets the activation defence."""
        h0 = self.front(input_ids, attention_mask)  # (batch, seq, hidden)
        return h0 if self.defence is None else self.defence.defend_h0(h0)

    def forward_back(self, h1: torch.Tensor, batch: LMBatch) -> torch.Tensor:
        """Run the output block on the server's h1 and return the loss (kept for `backward_back`)."""
        # (batch, seq, hidden), a leaf whose grad goes back to the server
        self._h1 = h1.detach().to(self._dtype).requires_grad_(True)
        labels = batch["labels"]
        # Only the scored tokens go through the LM head: a classification batch scores a few tokens per
        # row, at different positions, so the (batch, kept positions, vocab) logits were mostly unused.
        positions = target_token_mask(labels) if self.cfg.score_only_targets else None
        with _autocast(self.cfg, h1.device):
            logits = self.back(
                self._h1, batch["attention_mask"], logits_to_keep=0 if positions is None else positions
            )  # (batch, seq, vocab), or (n_scored, vocab)
        self._loss = causal_lm_loss(logits, labels, positions)
        return self._loss

    def backward_back(self) -> torch.Tensor:
        """Backward through the output block; returns dL/dh1 to send to the server (noised if so set)."""
        if self._loss is None or self._h1 is None:
            raise RuntimeError("backward_back() before forward_back()")
        self._loss.backward()
        grad_h1 = self._h1.grad
        assert grad_h1 is not None  # h1 is a leaf that requires grad
        self._loss = self._h1 = None
        if self.defence is not None:
            # Only the copy that leaves is noised: the back's own gradients are already accumulated.
            grad_h1 = self.defence.defend_grad_h1(grad_h1)
        return grad_h1  # (batch, seq, hidden)

    def backward_front(self, grad_h0: torch.Tensor) -> None:
        """Finish backward through the input block with the server's dL/dh0 (plus the local penalty's)."""
        if self._h0 is None:
            raise RuntimeError("backward_front() before forward_front()")
        if self._h0.requires_grad:  # False when the front has nothing trainable
            tensors, grads = [self._h0], [grad_h0.to(self._h0.dtype)]
            if self._penalty is not None and self._penalty.requires_grad:
                tensors.append(self._penalty)
                grads.append(torch.ones_like(self._penalty))
            torch.autograd.backward(tensors, grads)
        self._h0 = self._penalty = None

    def step(self) -> None:
        """Apply the client optimizer and schedule."""
        self.optimizer.step()


class ServerSideTrainer:
    """The server's side: the body and its optimizer, with one autograd graph held per in-flight step."""

    def __init__(self, body: ServerBody | nn.Module, cfg: TrainConfig, max_pending_graphs: int = 8) -> None:
        if max_pending_graphs < 1:
            raise ValueError(f"max_pending_graphs must be >= 1, got {max_pending_graphs}")
        self.body, self.cfg, self.max_pending_graphs = body.train(), cfg, max_pending_graphs
        self.optimizer = SideOptimizer(trainable_parameters(body), cfg)
        self._dtype = _compute_dtype(body)
        self._graphs: OrderedDict[Hashable, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def pending_steps(self) -> list[Hashable]:
        """Step keys whose graphs are held, oldest first."""
        return list(self._graphs)

    def forward(
        self, step_key: Hashable, h0: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Run the body on a client's h0; returns a detached h1 and keeps the graph under `step_key`."""
        h0_leaf = h0.detach().to(self._dtype).requires_grad_(True)  # (batch, seq, hidden)
        with _autocast(self.cfg, h0.device):
            h1 = self.body(h0_leaf, attention_mask)  # (batch, seq, hidden)
        self._graphs[step_key] = (h0_leaf, h1)
        self._graphs.move_to_end(step_key)
        while len(self._graphs) > self.max_pending_graphs:  # a vanished client must not pin memory forever
            self._graphs.popitem(last=False)
        return h1.detach()

    def backward(self, step_key: Hashable, grad_h1: torch.Tensor) -> torch.Tensor:
        """Backward through the body for `step_key` (graph released); returns dL/dh0."""
        if step_key not in self._graphs:
            raise StepGraphMissing(
                f"no forward graph for step {step_key!r} (held: {len(self._graphs)}, "
                f"max {self.max_pending_graphs}); it was never run, already used, or evicted"
            )
        h0_leaf, h1 = self._graphs.pop(step_key)
        h1.backward(grad_h1.to(h1.dtype))
        grad_h0 = h0_leaf.grad
        assert grad_h0 is not None  # h0_leaf is a leaf that requires grad
        return grad_h0  # (batch, seq, hidden), in the body's dtype

    def drop(self, step_key: Hashable) -> None:
        """Forget a step's graph (a client gave up on it)."""
        self._graphs.pop(step_key, None)

    def step(self) -> None:
        """Apply the server optimizer and schedule."""
        self.optimizer.step()


class SplitTrainer:
    """The FL-GLM step in one process: exactly what agent and worker do, minus the wire."""

    def __init__(self, split: SplitModel, cfg: TrainConfig, defence: ClientDefence | None = None) -> None:
        self.client = ClientSideTrainer(split, cfg, defence)
        self.server = ServerSideTrainer(split.part("body"), cfg)
        self.steps_done = 0

    def train_step(self, batch: LMBatch) -> float:
        """One split step; returns the loss."""
        key = self.steps_done
        h0 = self.client.forward_front(batch)  # client → server
        h1 = self.server.forward(key, h0, batch["attention_mask"])  # server → client
        loss = self.client.forward_back(h1, batch)
        grad_h1 = self.client.backward_back()  # client → server
        grad_h0 = self.server.backward(key, grad_h1)  # server → client
        self.client.backward_front(grad_h0)
        self.client.step()
        self.server.step()
        self.steps_done += 1
        return float(loss.detach())


class CentralizedTrainer:
    """The reference: the unsplit model, one optimizer, the same loss, positions and schedule."""

    def __init__(self, model: nn.Module, cfg: TrainConfig) -> None:
        self.model, self.cfg = model.train(), cfg
        self.optimizer = SideOptimizer(trainable_parameters(model), cfg)

    def train_step(self, batch: LMBatch) -> float:
        """One step on the whole model; returns the loss."""
        input_ids, attention_mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        positions = target_positions(labels) if self.cfg.score_only_targets else None
        position_ids = position_ids_from_attention_mask(attention_mask, input_ids.shape[1])
        with _autocast(self.cfg, input_ids.device):
            logits = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=False,
                logits_to_keep=0 if positions is None else positions,
            ).logits  # (batch, kept, vocab)
        loss = causal_lm_loss(logits, labels, positions)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())
