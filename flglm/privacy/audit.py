"""`run_privacy_audit`: attack exactly what a curious server receives under one job's settings, at step 0.

Step 0 is the worst moment for every defence we offer: LoRA's B starts at zero, so a non-private input block
*is* the public one (and after each round the server computes the FedAvg'd client adapters itself, so it
knows the block again); a private input block is as far from the public one as `private_init_scale` puts it
and no farther. The audit therefore builds the client's input block as it is at the first step, applies the
job's defences (clip + noise, wire dtype, gradient noise) to real text, and runs every attack against the
tensors that would cross the wire, with the attacker's knowledge: the public weights, the job's settings,
public text of the same kind; never the private seed.
"""

from __future__ import annotations

import copy
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import torch
from torch import nn

from flglm.adapters import AdapterSpec, add_adapters, part_seed
from flglm.evaluation import rouge_l, wilson_interval
from flglm.models import load_split_parts, load_tokenizer
from flglm.privacy import attacks
from flglm.privacy.client import add_client_adapters, secret_generator
from flglm.privacy.defences import (
    ActivationDefence,
    add_gradient_noise,
    perturb_private_adapters,
    reference_h0_norm,
)
from flglm.privacy.report import AttackName, AttackResult, AuditRequest, PrivacyAudit
from flglm.split import PartName, SplitModel, SplitPlan
from flglm.trainers import causal_lm_loss
from flglm.wire.codec import parse_wire_dtype

AuditProgress = Callable[[str, int, int], None]  # (stage, done, total)
SWEEP_CANDIDATES = 256
GUIDE_CANDIDATES = 64
FULL_SWEEP_POSITIONS = 8  # positions checked against a whole-vocabulary exact sweep
FULL_SWEEP_BUDGET_S = 90.0
INVERTER_PUBLIC_SEQUENCES = 2048


@dataclass
class AuditText:
    attacked: torch.Tensor  # (sequences, seq_len) token ids
    public: torch.Tensor  # (n, seq_len) disjoint public text for the learned inverter
    source: str


def _chunks(tokenizer: object, texts: Sequence[str], seq_len: int, limit: int) -> torch.Tensor:
    """Consecutive `seq_len`-token pieces of the joined texts (no padding: every position is real text)."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text + "\n", add_special_tokens=False)["input_ids"])  # type: ignore[operator]
        if len(ids) >= seq_len * limit:
            break
    count = min(limit, len(ids) // seq_len)
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _corpus_texts(corpus: str) -> list[str]:
    from flglm import corpora

    if corpus == "tweets":
        return [tweet.classification_text(60) for tweet in corpora.load_health_tweets()]
    return [article.classification_text(400) for article in corpora.load_news_articles()]


def audit_text(request: AuditRequest, tokenizer: object) -> AuditText:
    """The attacked sequences and a disjoint public corpus slice for training the inverter."""
    corpus = _corpus_texts(request.corpus)
    random.Random(request.seed).shuffle(corpus)
    if request.texts:
        attacked = _chunks(tokenizer, request.texts, request.seq_len, request.sequences)
        public_texts, source = corpus, f"{len(request.texts)} given texts"
    else:
        half = len(corpus) // 2
        attacked = _chunks(tokenizer, corpus[:half], request.seq_len, request.sequences)
        public_texts, source = corpus[half:], f"{request.corpus} corpus (held-apart halves)"
    if len(attacked) == 0:
        raise ValueError(f"the audit text has fewer than seq_len={request.seq_len} tokens")
    public = _chunks(tokenizer, public_texts, request.seq_len, INVERTER_PUBLIC_SEQUENCES)
    return AuditText(attacked, public, source)


def _wire(tensor: torch.Tensor, wire_dtype: str) -> torch.Tensor:
    """What survives the trip: the tensor in the wire dtype, back in float32 at the other end."""
    dtype = parse_wire_dtype(wire_dtype) or torch.float32
    return tensor.to(dtype).float()


def _result(
    name: AttackName,
    target: str,
    description: str,
    predicted: torch.Tensor,
    truth: torch.Tensor,
    tokenizer: object,
    started: float,
) -> AttackResult:
    hits = attacks.token_recovery(predicted, truth)
    total = truth.numel()
    decode = tokenizer.decode  # type: ignore[attr-defined]
    rouge = [rouge_l(decode(p.tolist()), decode(t.tolist())) for p, t in zip(predicted, truth, strict=True)]
    return AttackResult(
        attack=name,
        target=target,  # type: ignore[arg-type]
        description=description,
        tokens=total,
        recovered=hits,
        token_recovery=hits / total,
        token_recovery_ci=wilson_interval(hits, total),
        sequences=len(truth),
        exact_sequences=attacks.exact_sequences(predicted, truth),
        rouge_l=sum(rouge) / len(rouge),
        wall_s=time.monotonic() - started,
    )


def run_privacy_audit(request: AuditRequest, progress: AuditProgress | None = None) -> PrivacyAudit:
    """Run the requested attacks on what the server would receive under `request`'s settings at step 0."""
    started = time.monotonic()

    def report(stage: str) -> attacks.Progress:
        return lambda done, total: progress(stage, done, total) if progress is not None else None

    privacy = request.privacy
    report("loading the model")(0, 1)
    tokenizer = load_tokenizer(request.model_ref)
    plan = SplitPlan(request.split_plan.front_layers, request.split_plan.back_layers)
    wanted: set[PartName] = (
        {"front", "body", "back"} if "gradient_next_token" in request.attacks else {"front"}
    )
    split = load_split_parts(request.model_ref, plan, parts=wanted)
    text = audit_text(request, tokenizer)
    truth = text.attacked
    mask = torch.ones_like(truth)
    adapter = AdapterSpec(r=request.adapter_r, alpha=request.adapter_alpha)

    # The client's input block at step 0. Its adapters come from the job seed (known to the server) or, with
    # private_front, from a seed only the client knows, perturbed by private_init_scale.
    client_front = split.part("front").eval()
    embeddings = client_front.get_parameter("embed_tokens.weight")  # (vocab, hidden)
    vocab, hidden = int(embeddings.shape[0]), int(embeddings.shape[1])
    reference = reference_h0_norm(client_front, vocab)
    defence = ActivationDefence.from_spec(
        privacy.activation_clip, privacy.activation_noise, reference, hidden
    )
    attacker_front = copy.deepcopy(client_front)
    # The client's adapters as an agent adds them (a private block from a seed the attacker never sees).
    client_only = SplitModel(front=client_front, body=None, back=None, plan=plan, num_layers=split.num_layers)
    private_seed = secrets.randbits(62) if privacy.private_front else None
    add_client_adapters(client_only, adapter, request.seed, private_seed, privacy.private_init_scale)
    # The attacker's copy: the job-seed adapters, at step 0 the public block (B = 0), exactly the client's
    # without private_front.
    add_adapters(attacker_front, adapter, part_seed(request.seed, "front"))
    noise = secret_generator()
    with torch.no_grad():
        clean_h0 = client_front(truth, mask)  # (n, seq, hidden)
        observed = _wire(defence(clean_h0, noise), privacy.wire_dtype)  # what the server decodes

    results: list[AttackResult] = []
    inverter: attacks.TokenInverter | None = None
    if {"learned_inverter", "known_weights_inversion"} & set(request.attacks):
        # Trained first: its top tokens also guide the sweep's shortlist past the first layer.
        t0 = time.monotonic()
        simulated = copy.deepcopy(attacker_front)

        def simulate_h0(ids: torch.Tensor, draw: int) -> torch.Tensor:
            # A fresh simulated client every batch: its own private perturbation and noise.
            if privacy.private_front:
                perturb_private_adapters(
                    simulated, privacy.private_init_scale, torch.Generator().manual_seed(10_000 + draw)
                )
            h0 = simulated(ids, torch.ones_like(ids))
            return _wire(defence(h0, torch.Generator().manual_seed(20_000 + draw)), privacy.wire_dtype)

        inverter = attacks.train_inverter(
            simulate_h0,
            text.public,
            embeddings,
            steps=request.inverter_steps,
            seed=request.seed,
            progress=report("learned inverter (training steps)"),
        )
        if "learned_inverter" in request.attacks:
            results.append(
                _result(
                    "learned_inverter",
                    "h0",
                    f"MLP inverter trained {request.inverter_steps} steps on {len(text.public)} public "
                    "sequences through simulated clients with the job's defences (fresh private perturbation "
                    "and noise per batch)",
                    attacks.invert(inverter, observed),
                    truth,
                    tokenizer,
                    t0,
                )
            )

    if "known_weights_inversion" in request.attacks:
        assert inverter is not None
        t0 = time.monotonic()
        codes = attacks.vocabulary_codes(attacker_front, vocab)
        guide = attacks.inverter_top_tokens(inverter, observed, GUIDE_CANDIDATES)
        predicted, margin = attacks.sweep_inversion(
            attacker_front,
            observed,
            codes,
            defence.clip_norm,
            SWEEP_CANDIDATES,
            report("known-weights inversion (positions)"),
            guide=guide,
        )
        recall = _shortlist_recall(observed, codes, guide, truth, defence.clip_norm)
        check = _full_sweep_check(attacker_front, observed, predicted, truth, vocab, defence, request, report)
        known = "the public input block" if privacy.private_front else "the client's exact input block"
        result = _result(
            "known_weights_inversion",
            "h0",
            f"whole-vocabulary scan + exact re-run on the recovered prefix of the {SWEEP_CANDIDATES} nearest "
            f"token codes and the inverter's {GUIDE_CANDIDATES} top tokens, with {known}",
            predicted,
            truth,
            tokenizer,
            t0,
        )
        results.append(
            result.model_copy(update={"checks": {"shortlist_recall": recall, "margin": margin, **check}})
        )

    if "gradient_next_token" in request.attacks:
        t0 = time.monotonic()
        results.append(
            _gradient_attack(split.part("body"), split.part("back"), observed, truth, request, tokenizer)
        )
        results[-1] = results[-1].model_copy(update={"wall_s": time.monotonic() - t0})

    strongest = max(results, key=lambda r: r.token_recovery, default=None)
    return PrivacyAudit(
        request=request,
        moment="first_step",
        attacks=results,
        strongest_attack=strongest.attack if strongest else None,
        strongest_token_recovery=strongest.token_recovery if strongest else None,
        activation_epsilon=defence.epsilon() if defence.active else None,
        text_source=text.source,
        wall_s=time.monotonic() - started,
        finished_at=datetime.now(UTC),
    )


def _gradient_attack(
    body: nn.Module,
    back: nn.Module,
    observed: torch.Tensor,
    truth: torch.Tensor,
    request: AuditRequest,
    tokenizer: object,
) -> AttackResult:
    """The client trains on every next token (the generation task: the worst case), sends dL/dh1 with its
    gradient noise; the server, holding h1 and the public output block, reads the next tokens back."""
    t0 = time.monotonic()
    mask = torch.ones_like(truth)
    body, back = body.eval(), back.eval()
    predicted = torch.zeros_like(truth[:, 1:])
    for start in range(0, len(truth), 8):
        rows = slice(start, start + 8)
        with torch.no_grad():
            h1 = _wire(body(observed[rows], mask[rows]), request.privacy.wire_dtype)  # (b, seq, hidden)
        h1_leaf = h1.clone().requires_grad_(True)
        causal_lm_loss(back(h1_leaf, mask[rows]), truth[rows]).backward()
        assert h1_leaf.grad is not None
        noisy = add_gradient_noise(h1_leaf.grad, request.privacy.gradient_noise)
        sent = _wire(noisy, request.privacy.wire_dtype)
        predicted[rows] = attacks.gradient_next_token_attack(back, h1, sent, mask[rows])[:, :-1]
    return _result(
        "gradient_next_token",
        "dL/dh1",
        "next tokens read from the cut gradient through the public output block's final norm and head "
        "(client training on every next token; classification exposes only its label tokens)",
        predicted,
        truth[:, 1:],
        tokenizer,
        t0,
    )


def _shortlist_recall(
    observed: torch.Tensor,
    codes: torch.Tensor,
    guide: torch.Tensor,
    truth: torch.Tensor,
    clip_norm: float | None,
) -> float:
    """Share of positions whose true token was among the sweep's candidates (what bounds the sweep)."""
    flat = observed.reshape(-1, observed.shape[-1]).float()
    clipped = attacks.clip_rows(codes, clip_norm)
    near = torch.cat(
        [
            torch.cdist(flat[i : i + 1024], clipped).topk(SWEEP_CANDIDATES, largest=False).indices
            for i in range(0, len(flat), 1024)
        ]
    )  # (positions, k)
    candidates = torch.cat([near, guide.reshape(len(flat), -1)], dim=1)
    return float((candidates == truth.reshape(-1, 1)).any(1).float().mean())


def _full_sweep_check(
    front: nn.Module,
    observed: torch.Tensor,
    predicted: torch.Tensor,
    truth: torch.Tensor,
    vocab: int,
    defence: ActivationDefence,
    request: AuditRequest,
    report: Callable[[str], attacks.Progress],
) -> dict[str, float]:
    """Run the shortlist-free sweep at a few random positions (within a time budget): how often it finds the
    true token, and how often it beats the shortlisted answer (then the sweep above underestimates)."""
    generator = random.Random(request.seed + 1)
    rows, seq = truth.shape
    positions = [(generator.randrange(rows), generator.randrange(seq)) for _ in range(FULL_SWEEP_POSITIONS)]
    started = time.monotonic()
    checked: list[tuple[int, int]] = []
    found: list[int] = []
    for position in positions:
        if checked and time.monotonic() - started > FULL_SWEEP_BUDGET_S:
            break  # at least one position, then as many as the budget allows
        sweep = attacks.full_vocabulary_sweep(
            front, observed, predicted, [position], vocab, defence.clip_norm
        )
        found.append(int(sweep[0]))
        checked.append(position)
        report("full-vocabulary check (positions)")(len(checked), len(positions))
    truth_at = torch.tensor([int(truth[r, t]) for r, t in checked])
    shortlisted = torch.tensor([int(predicted[r, t]) for r, t in checked])
    exact = torch.tensor(found)
    return {
        "full_sweep_positions": float(len(checked)),
        "full_sweep_recovered": float((exact == truth_at).float().mean()),
        "full_sweep_beat_shortlist": float(((exact == truth_at) & (shortlisted != truth_at)).float().mean()),
    }
