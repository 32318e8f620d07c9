"""Client-side defences of what crosses the cut: clipped Gaussian noise on h0, noise on dL/dh1, a private
input block (adapters from a private seed, perturbed from step 0) and a distance-correlation penalty (NoPeek).

Every defence runs in the data owner's process, before sealing, so the server only ever sees the defended
tensors. The settings are `flglm.protocol.PrivacySpec`; `ActivationDefence.from_spec` turns them into the
mechanism. Scales are relative so that one setting means the same on every model:

- `activation_clip` c: each token's h0 is clipped to L2 norm C = c × the model's reference norm (the median
  norm of the *public* input block's output over a fixed set of vocabulary tokens, computable by anyone);
- `activation_noise` m: Gaussian noise of std m·C/√hidden per coordinate is added after clipping, so the
  noise vector's norm is about m × C ("noise-to-signal" m). Per h0 vector this is the Gaussian mechanism
  with L2 sensitivity 2C (any token's vector replaced by any other), whose (ε, δ) `gaussian_epsilon` reports;
  a token also shifts the vectors of later positions, so a sequence-level guarantee composes over positions.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from flglm.privacy.epsilon import DEFAULT_DELTA, gaussian_epsilon

# Vocabulary tokens used to measure the public reference norm: a fixed stride over the vocabulary.
REFERENCE_TOKENS = 1024


@torch.no_grad()
def reference_h0_norm(front: nn.Module, vocab_size: int, tokens: int = REFERENCE_TOKENS) -> float:
    """Median L2 norm of the input block's output for `tokens` vocabulary ids, each alone at position 0.

    Call it on the *public* input block (before private adapters change it): the result is then a public
    number that the client, the server and the audit compute alike.
    """
    ids = torch.linspace(0, vocab_size - 1, steps=min(tokens, vocab_size)).long().unsqueeze(1)  # (n, 1)
    device = next(front.parameters()).device
    was_training = front.training
    front.eval()
    try:
        h0 = front(ids.to(device), torch.ones_like(ids).to(device))[:, 0]  # (n, hidden)
    finally:
        front.train(was_training)
    return float(h0.float().norm(dim=-1).median())


@dataclass(frozen=True)
class ActivationDefence:
    """Per-token clipping of h0 to `clip_norm`, then Gaussian noise of std `noise_std` (both absolute)."""

    clip_norm: float | None  # None: no clipping (and no noise)
    noise_std: float

    @classmethod
    def from_spec(
        cls, activation_clip: float, activation_noise: float, reference_norm: float, hidden_size: int
    ) -> ActivationDefence:
        """The mechanism for the relative settings of `PrivacySpec` on a model with this reference norm."""
        if activation_noise <= 0:
            return cls(clip_norm=None, noise_std=0.0)
        clip = activation_clip * reference_norm
        return cls(clip_norm=clip, noise_std=activation_noise * clip / math.sqrt(hidden_size))

    @property
    def active(self) -> bool:
        return self.clip_norm is not None

    def epsilon(self, delta: float = DEFAULT_DELTA) -> float:
        """(ε, δ) of one h0 vector (sensitivity 2C); inf when off."""
        if self.clip_norm is None:
            return math.inf
        return gaussian_epsilon(self.noise_std, 2 * self.clip_norm, delta)

    def __call__(self, h0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Clip each token's vector and add noise; differentiable (the clip's Jacobian reaches the front)."""
        if self.clip_norm is None:
            return h0
        norms = h0.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (batch, seq, 1)
        clipped = h0 * (self.clip_norm / norms).clamp(max=1.0).to(h0.dtype)  # (batch, seq, hidden)
        noise = torch.randn(h0.shape, generator=generator, dtype=torch.float32, device="cpu")
        return clipped + (noise * self.noise_std).to(device=h0.device, dtype=h0.dtype)


def add_gradient_noise(
    grad: torch.Tensor, multiplier: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """dL/dh1 plus Gaussian noise of std `multiplier` × the tensor's RMS per coordinate (0: unchanged)."""
    if multiplier <= 0:
        return grad
    rms = grad.float().pow(2).mean().sqrt()
    noise = torch.randn(grad.shape, generator=generator, dtype=torch.float32, device="cpu")
    return grad + (noise.to(grad.device) * rms * multiplier).to(grad.dtype)


@torch.no_grad()
def perturb_private_adapters(front: nn.Module, scale: float, generator: torch.Generator) -> int:
    """Draw every LoRA B of `front` at random so each adapted weight starts `scale` × ‖W‖ away from the public
    weight (‖(α/r)·B·A‖_F = scale·‖W‖_F); returns how many modules were perturbed. 0 leaves B at zero.

    Without this, a client-private input block *is* the public one at the first step (LoRA's B starts at 0).
    """
    if scale <= 0:
        return 0
    count = 0
    # peft's LoRA layers wrap the Linear (it becomes their `base_layer`), so they are found by their
    # lora_A/lora_B dicts, not as Linear modules.
    module: Any  # a peft LoRA layer: attributes mypy cannot see
    for module in front.modules():
        lora_a: Any = getattr(module, "lora_A", None)
        lora_b: Any = getattr(module, "lora_B", None)
        if lora_a is None or lora_b is None or "default" not in lora_b:
            continue
        weight = module.base_layer.weight  # (out, in), or (in, out) for GPT-2 Conv1D
        a, b = lora_a["default"].weight, lora_b["default"].weight  # (r, in), (out, r)
        random_b = torch.randn(b.shape, generator=generator, dtype=torch.float32).to(b.dtype)
        delta = module.scaling["default"] * (random_b @ a)  # (out, in)
        b.copy_(random_b * (scale * weight.norm() / delta.norm().clamp_min(1e-12)))
        count += 1
    return count


def distance_correlation(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation of the rows of x (n, p) and y (n, q), in [0, 1]; differentiable."""

    def centred(z: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(z.float(), z.float())  # (n, n)
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(x), centred(y)
    dcov_xy = (a * b).mean().clamp_min(0)
    dcov_xx, dcov_yy = (a * a).mean(), (b * b).mean()
    return (dcov_xy / (dcov_xx * dcov_yy).sqrt().clamp_min(1e-12)).sqrt()


@contextmanager
def public_weights(front: nn.Module) -> Iterator[None]:
    """Run `front` as the public block: LoRA layers bypassed (peft's `disable_adapters` flag) inside."""
    layers: list[Any] = [
        m for m in front.modules() if hasattr(m, "lora_A") and hasattr(m, "_disable_adapters")
    ]
    previous = [m._disable_adapters for m in layers]
    try:
        for module in layers:
            module._disable_adapters = True  # peft's own switch (enable_adapters also toggles requires_grad)
        yield
    finally:
        for module, flag in zip(layers, previous, strict=True):
            module._disable_adapters = flag
