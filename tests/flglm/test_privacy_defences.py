"""The client-side defences inside the trainer: h0 clip + noise in the graph, dL/dh1 noise, the private input
block and the NoPeek penalty, and the torch-free ε the control plane and the consent text show."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from flglm.adapters import AdapterSpec, add_split_adapters, trainable_state_dict
from flglm.models import load_config, load_model
from flglm.privacy.client import ClientDefence, add_client_adapters
from flglm.privacy.defences import ActivationDefence, public_weights, reference_h0_norm
from flglm.privacy.epsilon import (
    KNOWN_HIDDEN_SIZES,
    activation_epsilon,
    gaussian_delta,
    hidden_size_hint,
)
from flglm.protocol import PrivacySpec
from flglm.split import SplitModel, SplitPlan, split_model
from flglm.tiny_models import TINY_ARCHITECTURES
from flglm.trainers import ClientSideTrainer, SplitTrainer, TrainConfig

ADAPTER = AdapterSpec(r=4, alpha=8)
CFG = TrainConfig(lr=5e-3)


def tiny_split(private_seed: int | None = None, scale: float = 0.0) -> SplitModel:
    split = split_model(load_model("tiny:llama:0"), SplitPlan(1, 1))
    return add_client_adapters(split, ADAPTER, 0, private_seed, scale)


def defence(**settings: float | bool) -> tuple[ClientDefence, SplitModel]:
    split = tiny_split()
    spec = PrivacySpec.model_validate(settings)
    return ClientDefence.from_spec(spec, split.part("front"), torch.Generator().manual_seed(7)), split


def test_epsilon_is_the_analytic_gaussian_mechanism_and_torch_free() -> None:
    mechanism = ActivationDefence.from_spec(1.0, 2.0, reference_norm=3.7, hidden_size=64)
    epsilon = mechanism.epsilon()
    assert epsilon == pytest.approx(activation_epsilon(2.0, 64), rel=1e-9)  # scale-free: C drops out
    ratio = 2 * mechanism.clip_norm / mechanism.noise_std  # type: ignore[operator]
    assert gaussian_delta(epsilon, ratio) == pytest.approx(1e-5, rel=1e-6)  # the smallest ε for δ = 1e-5
    assert activation_epsilon(8.0, 64) < epsilon < activation_epsilon(0.5, 64)  # more noise, smaller ε
    assert math.isinf(activation_epsilon(0.0, 64)) and math.isinf(ActivationDefence(None, 0.0).epsilon())
    # A large ratio (m = 1 on SmolLM2's 576 dimensions: 48): e^ε·Φ(b) is as large as Φ(a) while Φ(b) is
    # below 1e-130. Reference values: mpmath at 50 digits; dropping the second term would say 1.07e-5.
    assert gaussian_delta(1356.0, 48.0) == pytest.approx(9.775584592935677e-06, rel=1e-9)
    assert gaussian_delta(1300.0, 48.0) == pytest.approx(9.561720394913584e-04, rel=1e-9)
    done = subprocess.run(
        [sys.executable, "-c", "import sys, flglm.privacy.epsilon as e; e.activation_epsilon(1.0, 576); "
         "e.hidden_size_hint('tiny:llama'); assert 'torch' not in sys.modules"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("ref", [*(f"tiny:{arch}" for arch in TINY_ARCHITECTURES), *KNOWN_HIDDEN_SIZES])
def test_hidden_size_hints_match_the_configs(ref: str) -> None:
    assert hidden_size_hint(ref) == load_config(ref).hidden_size


def test_h0_is_clipped_and_noised_at_the_configured_scale_and_the_clip_reaches_the_front(make_batch) -> None:  # type: ignore[no-untyped-def]
    guard, split = defence(activation_noise=0.3, activation_clip=0.5)
    front = split.part("front")
    with public_weights(front):
        reference = reference_h0_norm(front, 384)
    clip = 0.5 * reference
    assert guard.activation.clip_norm == pytest.approx(clip)
    trainer = ClientSideTrainer(split, CFG, guard)
    batch = make_batch("right", batch=4, seq=16)
    with torch.no_grad():
        clean = front(batch["input_ids"], batch["attention_mask"])  # (batch, seq, hidden)
    sent = trainer.forward_front(batch)
    clipped = clean * (clip / clean.norm(dim=-1, keepdim=True)).clamp(max=1.0)
    real = batch["attention_mask"].bool()
    assert bool((clean.norm(dim=-1)[real] > clip).all())  # the clip binds on every real token
    noise = (sent - clipped).norm(dim=-1)  # (batch, seq): per-token noise norm ≈ m·C
    assert noise.mean() == pytest.approx(0.3 * clip, rel=0.1)
    assert float(noise.min()) > 0.3 * 0.3 * clip and float(noise.max()) < 2.0 * 0.3 * clip
    assert float(sent.norm(dim=-1).max()) < clip * (1 + 2 * 0.3)

    # Backward goes through the clip: the front's gradient differs from the undefended one (same dL/dh0).
    grad_h0 = torch.randn(sent.shape, generator=torch.Generator().manual_seed(1))
    trainer.backward_front(grad_h0)
    defended = {n: p.grad.clone() for n, p in front.named_parameters() if p.grad is not None}
    plain = ClientSideTrainer(split, CFG)
    for p in front.parameters():
        p.grad = None
    plain.forward_front(batch)
    plain.backward_front(grad_h0)
    undefended = {n: p.grad for n, p in front.named_parameters() if p.grad is not None}
    assert defended.keys() == undefended.keys() and defended
    assert any(not torch.allclose(defended[n], undefended[n]) for n in defended)


def test_eval_h0_gets_the_same_defence(make_batch) -> None:  # type: ignore[no-untyped-def]
    guard, split = defence(activation_noise=0.3, activation_clip=0.5)
    trainer = ClientSideTrainer(split, CFG, guard)
    batch = make_batch("none")
    with torch.no_grad():
        clean = trainer.front(batch["input_ids"], batch["attention_mask"])
        sent = trainer.eval_front(batch["input_ids"], batch["attention_mask"])
    assert float(sent.norm(dim=-1).max()) < guard.activation.clip_norm * 1.6  # type: ignore[operator]
    assert not torch.allclose(sent, clean)
    assert torch.equal(
        ClientSideTrainer(split, CFG).eval_front(batch["input_ids"], batch["attention_mask"]), clean
    )


def test_gradient_noise_only_on_what_leaves(make_batch) -> None:  # type: ignore[no-untyped-def]
    guard, split = defence(gradient_noise=0.5)
    batch = make_batch("right")
    h1 = torch.randn(*batch["input_ids"].shape, 32, generator=torch.Generator().manual_seed(3))
    outputs = []
    for trainer in (ClientSideTrainer(split, CFG), ClientSideTrainer(split, CFG, guard)):
        trainer.forward_back(h1, batch)
        grad_h1 = trainer.backward_back()
        back_grads = {n: p.grad.clone() for n, p in trainer.back.named_parameters() if p.grad is not None}
        for p in trainer.back.parameters():
            p.grad = None
        outputs.append((grad_h1, back_grads))
    (clean, clean_back), (noisy, noisy_back) = outputs
    rms = float(clean.pow(2).mean().sqrt())
    assert float((noisy - clean).std()) == pytest.approx(0.5 * rms, rel=0.15)
    assert all(torch.equal(clean_back[n], noisy_back[n]) for n in clean_back)  # the back learns as before


def test_private_front_is_drawn_privately_and_differs_from_the_public_block_from_step_0(make_batch) -> None:  # type: ignore[no-untyped-def]
    batch = make_batch("none")
    public = tiny_split()
    private = tiny_split(private_seed=12345, scale=0.2)
    unperturbed = tiny_split(private_seed=12345, scale=0.0)
    public_state, private_state = (trainable_state_dict(s.part("front")) for s in (public, private))
    assert public_state.keys() == private_state.keys()
    assert all(not torch.equal(public_state[k], private_state[k]) for k in public_state if "lora_A" in k)
    back = [trainable_state_dict(s.part("back")) for s in (public, private)]
    assert all(torch.equal(back[0][k], back[1][k]) for k in back[0])  # the shared parts follow the job seed
    for name in ("stack.layers.0.self_attn.q_proj", "stack.layers.0.mlp.down_proj"):
        lora = private.part("front").get_submodule(name)  # ‖(α/r)·B·A‖ = s·‖W‖ for every adapted weight
        delta = lora.scaling["default"] * lora.lora_B["default"].weight @ lora.lora_A["default"].weight
        assert float(delta.detach().norm() / lora.base_layer.weight.norm()) == pytest.approx(0.2, rel=1e-4)
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        h_public = public.part("front")(ids, mask)
        assert torch.allclose(unperturbed.part("front")(ids, mask), h_public)  # LoRA B = 0: public block
        h_private = private.part("front")(ids, mask)
        assert (h_private - h_public).norm() > 0.05 * h_public.norm()
        with public_weights(private.part("front")):
            assert torch.allclose(private.part("front")(ids, mask), h_public)  # what the reference norm uses
    again = tiny_split(private_seed=12345, scale=0.2)  # the persisted seed rebuilds the same block
    assert all(torch.equal(v, trainable_state_dict(again.part("front"))[k]) for k, v in private_state.items())


def test_decorrelation_penalty_trains_the_front_and_every_defence_trains(make_batch) -> None:  # type: ignore[no-untyped-def]
    split = tiny_split(private_seed=5, scale=0.1)
    spec = PrivacySpec(private_front=True, private_init_scale=0.1, decorrelation=2.0)
    guard = ClientDefence.from_spec(spec, split.part("front"), torch.Generator().manual_seed(0))
    trainer = ClientSideTrainer(split, CFG, guard)
    trainer.forward_front(make_batch("right"))
    assert trainer.last_decorrelation is not None and 0 < trainer.last_decorrelation <= 2.0
    trainer.backward_front(torch.zeros(3, 12, 32))  # no server gradient: only the penalty's
    grads = [p.grad for p in split.part("front").parameters() if p.requires_grad]
    assert grads and any(g is not None and g.abs().sum() > 0 for g in grads)

    everything = PrivacySpec(
        activation_noise=0.5,
        gradient_noise=0.5,
        private_front=True,
        private_init_scale=0.1,
        decorrelation=1.0,
    )
    full = split_model(load_model("tiny:llama:0"), SplitPlan(1, 1))
    add_split_adapters(full, ADAPTER, 0)
    loop = SplitTrainer(full, CFG, ClientDefence.from_spec(everything, full.part("front")))
    losses = [loop.train_step(make_batch("left", seed=i)) for i in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
