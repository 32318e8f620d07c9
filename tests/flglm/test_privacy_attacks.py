"""The attacks of `flglm.privacy` on tiny models: strong where nothing defends (so a broken attack can never
pass for a strong defence), and weakened by exactly the defences that should weaken them."""

from __future__ import annotations

import torch

from flglm.models import load_split_parts
from flglm.privacy import attacks
from flglm.privacy.audit import run_privacy_audit
from flglm.privacy.defences import ActivationDefence, reference_h0_norm
from flglm.privacy.report import AuditRequest
from flglm.split import SplitPlan
from flglm.trainers import causal_lm_loss

MODEL = "tiny:llama"


def _front(front_layers: int = 1) -> torch.nn.Module:
    return load_split_parts(MODEL, SplitPlan(front_layers, 1), parts={"front"}).part("front").eval()


def _ids(rows: int = 6, seq: int = 12, vocab: int = 200, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (rows, seq), generator=generator)


def test_sweep_recovers_every_token_of_an_undefended_front() -> None:
    front = _front()
    vocab = int(front.get_parameter("embed_tokens.weight").shape[0])
    ids = _ids(vocab=vocab)
    with torch.no_grad():
        observed = front(ids, torch.ones_like(ids))
    codes = attacks.vocabulary_codes(front, vocab)
    recovered, margin = attacks.sweep_inversion(front, observed, codes, candidates=16)
    assert (recovered == ids).float().mean() >= 0.95
    assert margin < 0.5  # the right candidate is far closer than the next one


def test_full_vocabulary_sweep_finds_tokens_a_bad_shortlist_misses() -> None:
    front = _front(2)
    vocab = int(front.get_parameter("embed_tokens.weight").shape[0])
    ids = _ids(rows=2, seq=6, vocab=vocab)
    with torch.no_grad():
        observed = front(ids, torch.ones_like(ids))
    positions = [(0, 3), (1, 5)]
    found = attacks.full_vocabulary_sweep(front, observed, ids, positions, vocab)
    assert found.tolist() == [int(ids[0, 3]), int(ids[1, 5])]
    # A shortlist of wrong candidates only is re-ranked into nothing right; the full sweep still finds them.
    wrong = ((ids + 1) % vocab).unsqueeze(-1)  # (rows, seq, 1)
    codes = torch.zeros(vocab, observed.shape[-1]) + 1e6  # codes that shortlist only token 0
    recovered, _ = attacks.sweep_inversion(front, observed, codes, candidates=1, guide=wrong)
    assert not bool((recovered[:, 1:] == ids[:, 1:]).any())


def test_noise_weakens_the_sweep_in_proportion() -> None:
    front = _front()
    embeddings = front.get_parameter("embed_tokens.weight")
    vocab, hidden = int(embeddings.shape[0]), int(embeddings.shape[1])
    ids = _ids(vocab=vocab)
    reference = reference_h0_norm(front, vocab)
    codes = attacks.vocabulary_codes(front, vocab)
    recovery = {}
    for noise in (0.0, 30.0):
        defence = ActivationDefence.from_spec(1.0, noise, reference, hidden)
        with torch.no_grad():
            observed = defence(front(ids, torch.ones_like(ids)), torch.Generator().manual_seed(1))
        recovered, _ = attacks.sweep_inversion(front, observed, codes, defence.clip_norm, candidates=16)
        recovery[noise] = float((recovered == ids).float().mean())
    assert recovery[0.0] >= 0.95
    assert recovery[30.0] < 0.3


def test_gradient_attack_reads_next_tokens_and_gradient_noise_stops_it() -> None:
    split = load_split_parts(MODEL, SplitPlan(1, 1), parts={"front", "body", "back"})
    back = split.part("back").eval()
    vocab = int(back.get_parameter("lm_head.weight").shape[0])
    ids = _ids(rows=4, seq=10, vocab=vocab)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        h1 = split.part("body")(split.part("front")(ids, mask), mask)
    leaf = h1.clone().requires_grad_(True)
    causal_lm_loss(back(leaf, mask), ids).backward()
    assert leaf.grad is not None
    predicted = attacks.gradient_next_token_attack(back, h1, leaf.grad, mask)
    assert (predicted[:, :-1] == ids[:, 1:]).float().mean() >= 0.95
    from flglm.privacy.defences import add_gradient_noise

    noisy = add_gradient_noise(leaf.grad, 50.0, torch.Generator().manual_seed(0))
    predicted = attacks.gradient_next_token_attack(back, h1, noisy, mask)
    assert (predicted[:, :-1] == ids[:, 1:]).float().mean() < 0.3


def test_audit_of_the_plain_split_recovers_the_text_and_reports_it() -> None:
    audit = run_privacy_audit(AuditRequest(model_ref=MODEL, sequences=4, seq_len=12))
    by_name = {result.attack: result for result in audit.attacks}
    assert set(by_name) == {"known_weights_inversion", "learned_inverter", "gradient_next_token"}
    sweep = by_name["known_weights_inversion"]
    assert sweep.token_recovery >= 0.95
    assert sweep.tokens == 4 * 12 and sweep.recovered == round(sweep.token_recovery * sweep.tokens)
    assert sweep.token_recovery_ci[0] <= sweep.token_recovery <= sweep.token_recovery_ci[1]
    assert sweep.checks["full_sweep_positions"] >= 1
    assert by_name["gradient_next_token"].tokens == 4 * 11  # the last position has no next token
    assert audit.strongest_token_recovery == max(r.token_recovery for r in audit.attacks)
    assert audit.activation_epsilon is None and audit.moment == "first_step"


def test_audit_sees_the_private_front_at_step_zero() -> None:
    """A private front with no perturbation equals the public block at step 0: the audit must say so."""
    unperturbed = run_privacy_audit(
        AuditRequest(
            model_ref=MODEL,
            sequences=3,
            seq_len=10,
            attacks=["known_weights_inversion"],
            privacy={"private_front": True, "private_init_scale": 0.0},  # type: ignore[arg-type]
        )
    )
    assert unperturbed.attacks[0].token_recovery >= 0.95
    noisy = run_privacy_audit(
        AuditRequest(
            model_ref=MODEL,
            sequences=3,
            seq_len=10,
            attacks=["known_weights_inversion"],
            privacy={"activation_noise": 40.0},  # type: ignore[arg-type]
        )
    )
    assert noisy.activation_epsilon is not None and noisy.activation_epsilon > 0
    assert noisy.attacks[0].token_recovery < unperturbed.attacks[0].token_recovery
