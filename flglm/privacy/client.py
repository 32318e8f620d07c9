"""A data owner's defences as one object its trainer applies (h0 clip + noise, dL/dh1 noise, NoPeek), and the
client parts' adapters with a private input block (drawn from a private seed, perturbed from step 0).

The noise comes from a generator seeded from the operating system's randomness, never from the job seed or
torch's default generator (which starts from a fixed seed): a server that could replay the noise could
subtract it.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass, field

import torch
from torch import nn

from flglm.adapters import AdapterSpec, add_adapters, add_split_adapters
from flglm.privacy.defences import (
    ActivationDefence,
    add_gradient_noise,
    distance_correlation,
    perturb_private_adapters,
    public_weights,
    reference_h0_norm,
)
from flglm.protocol import PrivacySpec
from flglm.split import SplitModel

# NoPeek's distance correlation costs O(n²) in the positions it compares: a random subsample of this many.
MAX_DECORRELATION_POSITIONS = 256
OFF = ActivationDefence(clip_norm=None, noise_std=0.0)


def secret_generator() -> torch.Generator:
    """A CPU generator seeded from the OS's randomness (see the module docstring)."""
    return torch.Generator().manual_seed(secrets.randbits(63))


def derived_seed(private_seed: int, purpose: str) -> int:
    """An independent 63-bit seed for one use of the private seed (adapter init, perturbation)."""
    digest = hashlib.sha256(f"{purpose}:{private_seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


@dataclass
class ClientDefence:
    """What the client trainer does to what leaves it; every field off gives the undefended step."""

    activation: ActivationDefence = OFF
    gradient_noise: float = 0.0  # std of the dL/dh1 noise per coordinate, × the tensor's RMS
    decorrelation: float = 0.0  # λ of the NoPeek penalty added to the input block's objective
    private_front: bool = False  # the input block's adapters are never uploaded nor averaged
    generator: torch.Generator = field(default_factory=secret_generator)

    @classmethod
    def from_spec(
        cls, spec: PrivacySpec, front: nn.Module, generator: torch.Generator | None = None
    ) -> ClientDefence:
        """The defences of a job's settings for this input block; the clip's reference norm is measured on
        the *public* block (adapters bypassed), so client, server and audit agree on it."""
        activation = OFF
        if spec.activation_noise > 0:
            vocab_size, hidden_size = front.get_parameter("embed_tokens.weight").shape
            with public_weights(front):
                reference = reference_h0_norm(front, int(vocab_size))
            activation = ActivationDefence.from_spec(
                spec.activation_clip, spec.activation_noise, reference, int(hidden_size)
            )
        return cls(
            activation=activation,
            gradient_noise=spec.gradient_noise,
            decorrelation=spec.decorrelation if spec.private_front else 0.0,
            private_front=spec.private_front,
            generator=generator or secret_generator(),
        )

    @property
    def active(self) -> bool:
        """Whether anything differs from the undefended step."""
        noisy = self.activation.active or self.gradient_noise > 0
        return noisy or self.decorrelation > 0 or self.private_front

    def defend_h0(self, h0: torch.Tensor) -> torch.Tensor:
        """h0 as it may leave: clipped and noised (differentiable), or unchanged when the noise is off."""
        return self.activation(h0, self.generator)

    def defend_grad_h1(self, grad_h1: torch.Tensor) -> torch.Tensor:
        """dL/dh1 as it may leave: with the gradient noise, or unchanged."""
        return add_gradient_noise(grad_h1, self.gradient_noise, self.generator)

    def decorrelation_penalty(
        self, front: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, h0: torch.Tensor
    ) -> torch.Tensor | None:
        """λ·dCor(token embeddings, h0) over the batch's real tokens (at most 256 of them); None when off.

        The embeddings are the input block's own (frozen) token embeddings, so the penalty pushes the
        adapted layers away from passing the tokens through recognisably.
        """
        if self.decorrelation <= 0:
            return None
        real = attention_mask.bool()  # (batch, seq)
        with torch.no_grad():
            embeddings = front.get_submodule("embed_tokens")(input_ids)[real].float()  # (n, hidden)
        hidden = h0[real].float()  # (n, hidden)
        if hidden.shape[0] < 2:
            return None  # one position has no distance to anything
        if hidden.shape[0] > MAX_DECORRELATION_POSITIONS:
            keep = torch.randperm(hidden.shape[0], generator=self.generator)[:MAX_DECORRELATION_POSITIONS]
            embeddings, hidden = embeddings[keep.to(embeddings.device)], hidden[keep.to(hidden.device)]
        return self.decorrelation * distance_correlation(embeddings, hidden)


def add_client_adapters(
    split: SplitModel,
    cfg: AdapterSpec,
    job_seed: int,
    private_seed: int | None = None,
    private_init_scale: float = 0.0,
) -> SplitModel:
    """The job's adapters on the parts this process holds; with `private_seed` the input block's are drawn
    from it instead of the job seed and moved `private_init_scale` × ‖W‖ away from the public weights, so
    that even at the first step the server does not know the block that produced h0."""
    if private_seed is None or split.front is None or "front" not in cfg.parts:
        return add_split_adapters(split, cfg, job_seed)
    shared = cfg.model_copy(update={"parts": [part for part in cfg.parts if part != "front"]})
    add_split_adapters(split, shared, job_seed)  # freezes the front; its adapters come next
    add_adapters(split.front, cfg, derived_seed(private_seed, "front-init"))
    generator = torch.Generator().manual_seed(derived_seed(private_seed, "front-perturbation"))
    perturb_private_adapters(split.front, private_init_scale, generator)
    return split
