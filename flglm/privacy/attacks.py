"""The attacks an honest-but-curious server can run on what it receives: h0 (forward) and dL/dh1 (backward).

- `sweep_inversion`: known-weights inversion of h0. Stage 1 scans the *whole* vocabulary at every position
  (each token's input-block output alone, "its code"); stage 2 runs the attacker's copy of the input block on
  (recovered prefix + candidate) for the `candidates` best, with a KV cache of the prefix, and keeps the one
  whose output is closest to what was received. Exact when the attacker's weights are the client's.
- `train_inverter` / `invert`: a learned inverter for fronts whose exact weights the server does not know: a
  small network trained on public text pushed through *simulated* defended fronts (fresh private
  perturbations and noise of the job's settings every batch), read out against the embedding matrix over the
  whole vocabulary.
- `gradient_next_token_attack`: the cut gradient dL/dh1 of a causal LM carries the next tokens. The server
  knows h1 (it computed it) and the public output block, so it maps dL/dh1 back to vocabulary space through
  the output block's final norm and head (the Jacobian at each position) and reads the most pulled-down
  logit: y = argmin_v ⟨J_t^T e_v, g_t⟩ / ‖J_t^T e_v‖.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

Progress = Callable[[int, int], None]  # (done, total)


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def clip_rows(h: torch.Tensor, clip_norm: float | None) -> torch.Tensor:
    """Each vector of `h` (..., hidden) clipped to L2 norm `clip_norm` (None: unchanged)."""
    if clip_norm is None:
        return h
    norms = h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return h * (clip_norm / norms).clamp(max=1.0)


@torch.no_grad()
def vocabulary_codes(front: nn.Module, vocab_size: int, batch: int = 8192) -> torch.Tensor:
    """The input block's output for every vocabulary token alone at position 0: (vocab, hidden), float32."""
    device, codes = _device(front), []
    for start in range(0, vocab_size, batch):
        ids = torch.arange(start, min(vocab_size, start + batch), device=device).unsqueeze(1)  # (b, 1)
        codes.append(front(ids, torch.ones_like(ids))[:, 0].float())  # (b, hidden)
    return torch.cat(codes)


@torch.no_grad()
def sweep_inversion(
    front: nn.Module,
    observed: torch.Tensor,
    codes: torch.Tensor,
    clip_norm: float | None = None,
    candidates: int = 256,
    progress: Progress | None = None,
    guide: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """Recover token ids (batch, seq) from `observed` h0 (batch, seq, hidden) of unpadded sequences.

    `front` is the attacker's copy of the input block; `codes` its `vocabulary_codes`; `clip_norm` the
    defence's clip (candidates are clipped like the client's vectors were). `guide` (batch, seq, g) adds g
    candidates per position from another ranking, e.g. a learned inverter's top tokens: past the first layer
    a token's context-free code stops predicting its output (4 layers of SmolLM2: the true token is among the
    256 nearest codes at 6 % of positions), while the exact re-run still identifies it when it is proposed.
    Returns the ids and the mean ratio of the best to the second-best candidate distance (near 0: confident).
    """
    batch, seq, hidden = observed.shape
    device = _device(front)
    observed = observed.to(device).float()
    k = min(candidates, codes.shape[0])
    clipped_codes = clip_rows(codes.to(device), clip_norm)  # (vocab, hidden)
    recovered = torch.zeros(batch, seq, dtype=torch.long, device=device)
    cache = DynamicCache()
    margins: list[float] = []
    for t in range(seq):
        shortlist = torch.cdist(observed[:, t], clipped_codes).topk(k, largest=False).indices  # (batch, k)
        if guide is not None:
            shortlist = torch.cat([shortlist, guide[:, t].to(device)], dim=1)  # (batch, k + g)
        width = shortlist.shape[1]
        if t == 0:
            outputs = clipped_codes[shortlist]  # (batch, k, hidden): alone at position 0, exactly the codes
        else:
            candidate_cache = copy.deepcopy(cache)
            candidate_cache.batch_repeat_interleave(width)
            mask = torch.ones(batch * width, t + 1, dtype=torch.long, device=device)
            flat = shortlist.reshape(batch * width, 1)  # (b·w, 1)
            out = front(flat, mask, past_key_values=candidate_cache)  # (b·w, 1, hidden)
            outputs = clip_rows(out[:, 0].float().view(batch, width, hidden), clip_norm)
        distances = (outputs - observed[:, t : t + 1]).norm(dim=-1)  # (batch, width)
        if guide is not None:  # a token proposed twice must not count as its own runner-up
            repeated = (shortlist.unsqueeze(2) == shortlist.unsqueeze(1)).triu(1).any(1)  # (batch, width)
            distances = distances.masked_fill(repeated, float("inf"))
        two = distances.topk(min(2, width), largest=False)
        if width > 1:
            margins.append(float((two.values[:, 0] / two.values[:, 1].clamp_min(1e-12)).mean()))
        best = shortlist.gather(1, two.indices[:, :1]).squeeze(1)  # (batch,)
        recovered[:, t] = best
        prefix_mask = torch.ones(batch, t + 1, dtype=torch.long, device=device)
        front(best.view(batch, 1), prefix_mask, past_key_values=cache)  # extend the prefix cache
        if progress is not None:
            progress(t + 1, seq)
    return recovered.cpu(), (sum(margins) / len(margins) if margins else 0.0)


@torch.no_grad()
def full_vocabulary_sweep(
    front: nn.Module,
    observed: torch.Tensor,
    prefixes: torch.Tensor,
    positions: list[tuple[int, int]],
    vocab_size: int,
    clip_norm: float | None = None,
    batch: int = 4096,
    progress: Progress | None = None,
) -> torch.Tensor:
    """The exact sweep with no shortlist at chosen (row, position) pairs: every vocabulary token is run after
    the recovered prefix `prefixes[row, :position]` and the closest output wins. Returns the ids (n,).

    A full sweep costs a vocabulary-sized batch through the input block per position (seconds on a CPU), so
    the audit runs it on a random sample of positions to check that stage 1's shortlist lost nothing.
    """
    device = _device(front)
    found = torch.zeros(len(positions), dtype=torch.long)
    for index, (row, position) in enumerate(positions):
        target = observed[row, position].to(device).float()  # (hidden,)
        cache = None
        if position > 0:
            cache = DynamicCache()
            prefix = prefixes[row : row + 1, :position].to(device)  # (1, position)
            front(prefix, torch.ones_like(prefix), past_key_values=cache)
        best_distance, best_token = float("inf"), 0
        for start in range(0, vocab_size, batch):
            ids = torch.arange(start, min(vocab_size, start + batch), device=device).unsqueeze(1)  # (b, 1)
            candidate_cache = None
            if cache is not None:
                candidate_cache = copy.deepcopy(cache)
                candidate_cache.batch_repeat_interleave(len(ids))
            mask = torch.ones(len(ids), position + 1, dtype=torch.long, device=device)
            out = clip_rows(front(ids, mask, past_key_values=candidate_cache)[:, 0].float(), clip_norm)
            distances = (out - target).norm(dim=-1)  # (b,)
            value, arg = distances.min(0)
            if float(value) < best_distance:
                best_distance, best_token = float(value), start + int(arg)
        found[index] = best_token
        if progress is not None:
            progress(index + 1, len(positions))
    return found


def shortlist_recall(observed: torch.Tensor, codes: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Share of positions whose true token is among stage 1's `k` candidates (what bounds the sweep)."""
    flat = observed.reshape(-1, observed.shape[-1]).float()
    hits = 0
    for start in range(0, flat.shape[0], 1024):
        top = torch.cdist(flat[start : start + 1024], codes.float()).topk(k, largest=False).indices
        hits += int((top == truth.reshape(-1)[start : start + 1024].unsqueeze(1)).any(1).sum())
    return hits / max(1, flat.shape[0])


class TokenInverter(nn.Module):
    """h0 of one position (with its left neighbour) → scores over the vocabulary via the embedding matrix."""

    def __init__(self, hidden: int, embeddings: torch.Tensor, width: int = 1024) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(2 * hidden)
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, width), nn.GELU(), nn.Linear(width, hidden))
        # Frozen, normalised readout: the inverter learns where each token's embedding lies, not a new table.
        self.register_buffer("readout", F.normalize(embeddings.detach().float(), dim=-1), persistent=False)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def forward(self, h0: torch.Tensor) -> torch.Tensor:
        """(batch, seq, hidden) → logits (batch, seq, vocab)."""
        previous = torch.cat([torch.zeros_like(h0[:, :1]), h0[:, :-1]], dim=1)  # (batch, seq, hidden)
        x = self.norm(torch.cat([h0, previous], dim=-1).float())  # (batch, seq, 2·hidden)
        readout: torch.Tensor = self.readout  # type: ignore[assignment]  # (vocab, hidden)
        return self.scale * F.normalize(self.mlp(x), dim=-1) @ readout.T


def train_inverter(
    simulate_h0: Callable[[torch.Tensor, int], torch.Tensor],
    public_ids: torch.Tensor,
    embeddings: torch.Tensor,
    steps: int = 300,
    batch_sequences: int = 16,
    lr: float = 2e-3,
    seed: int = 0,
    progress: Progress | None = None,
) -> TokenInverter:
    """Train a `TokenInverter` on public token sequences (n, seq) pushed through `simulate_h0(ids, draw)`,
    which must return the h0 the server would receive (defences included) for a fresh draw of the
    simulated client (`draw` numbers them: private perturbations and noise change every batch)."""
    generator = torch.Generator().manual_seed(seed)
    inverter = TokenInverter(embeddings.shape[1], embeddings)
    optimizer = torch.optim.AdamW(inverter.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.05, 1 - s / max(1, steps)))
    for step in range(steps):
        rows = torch.randint(0, public_ids.shape[0], (batch_sequences,), generator=generator)
        ids = public_ids[rows]  # (b, seq)
        with torch.no_grad():
            h0 = simulate_h0(ids, step).float()  # (b, seq, hidden)
        logits = inverter(h0)  # (b, seq, vocab)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if progress is not None:
            progress(step + 1, steps)
    return inverter.eval()


@torch.no_grad()
def invert(inverter: TokenInverter, observed: torch.Tensor, batch_sequences: int = 16) -> torch.Tensor:
    """The inverter's most likely token at every position: (batch, seq)."""
    rows = range(0, len(observed), batch_sequences)
    return torch.cat([inverter(observed[i : i + batch_sequences].float()).argmax(-1) for i in rows])


@torch.no_grad()
def inverter_top_tokens(inverter: TokenInverter, observed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverter's `k` most likely tokens at every position: (batch, seq, k)."""
    rows = range(0, len(observed), 16)
    return torch.cat([inverter(observed[i : i + 16].float()).topk(k, dim=-1).indices for i in rows])


def gradient_next_token_attack(
    back: nn.Module, h1: torch.Tensor, grad_h1: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Predicted next token at every position (batch, seq) from the cut gradient dL/dh1 and the known h1.

    With δ_t = ∂L/∂logits_t = (p_t − e_y)/n, the gradient is g = Jᵀδ (J = ∂logits/∂h1 through the
    attacker's copy of the output block). Pushing g forward again, J·g = JJᵀδ, whose entry v is most negative
    at v = y because JJᵀ is dominated by its diagonal. J·g is one Jacobian-vector product per sequence
    (through the last layers' residual path, exactly through the final norm with `torch.func.jvp`, then the
    head: SDPA has no forward-mode AD), never a vocabulary-sized Jacobian. Rows of the head are normalised
    so that large-norm tokens do not win by size alone.
    """
    head = _lm_head_weight(back)  # (vocab, hidden)
    head_norms = head.norm(dim=-1).clamp_min(1e-12)  # (vocab,)
    norm: nn.Module = getattr(back, "norm", None) or nn.Identity()
    stack: nn.Module = back.get_submodule("stack")
    was_training = back.training
    back.eval()
    predictions = torch.zeros(h1.shape[:2], dtype=torch.long)
    try:
        for row in range(h1.shape[0]):
            with torch.no_grad():
                row_h1 = h1[row : row + 1].float()  # (1, seq, hidden)
                last = stack(row_h1, attention_mask[row : row + 1])  # (1, seq, hidden)
            # Through the last layers' residual path (identity), then exactly through the final norm.
            tangent = torch.func.jvp(norm, (last,), (grad_h1[row : row + 1].float(),))[1]  # (1, seq, hidden)
            scores = (tangent[0] @ head.T) / head_norms  # (seq, vocab)
            predictions[row] = scores.argmin(-1).cpu()
    finally:
        back.train(was_training)
    return predictions


def _lm_head_weight(back: nn.Module) -> torch.Tensor:
    head = getattr(back, "lm_head", None)
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(back).__name__} has no lm_head with a weight to attack through")
    return head.weight.detach().float()


def token_recovery(predicted: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor | None = None) -> int:
    """How many positions were recovered exactly."""
    hits = predicted == truth
    return int(hits[mask.bool()].sum()) if mask is not None else int(hits.sum())


def exact_sequences(predicted: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of rows recovered entirely."""
    return float((predicted == truth).all(dim=1).float().mean())


def entropy_bits(logits: torch.Tensor) -> float:
    """Mean entropy in bits of softmax(logits) over the last axis (how unsure an inverter is)."""
    p = logits.float().softmax(-1)
    return float(-(p * p.clamp_min(1e-30).log()).sum(-1).mean() / math.log(2))
