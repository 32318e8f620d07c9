"""The (ε, δ) of the clipped Gaussian noise on h0, in plain Python: the control plane shows it without torch.

`flglm.privacy.defences.ActivationDefence` adds noise of std m·C/√hidden to vectors clipped to norm C; any
token's vector can be replaced by any other, so the L2 sensitivity is 2C and the ratio sensitivity / std is
2√hidden / m whatever C is: ε depends only on the noise setting m, the model's hidden size and δ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

DEFAULT_DELTA = 1e-5
DELTA_TEXT = f"{DEFAULT_DELTA:g}".replace("e-0", "e-")  # "1e-5", as people write it
# Hidden sizes of the built-in model refs (the tiny test models and the bundled SmolLM2), so that the
# torch-free control plane can state ε; tests/flglm/test_privacy_defences.py checks them against the configs.
KNOWN_HIDDEN_SIZES = {"smollm2-135m": 576, "smollm2-135m-instruct": 576}
TINY_HIDDEN_SIZE = 32


def _log_phi(x: float) -> float:
    """log Φ(x) of the standard normal, accurate far into the lower tail (where Φ underflows)."""
    if x > -30.0:
        return math.log(0.5 * math.erfc(-x / math.sqrt(2.0)))
    # Asymptotic series of Mills' ratio: for x < -30 the first omitted term is below 1e-10 relative.
    inv2 = 1.0 / (x * x)
    series = 1.0 - inv2 + 3.0 * inv2**2 - 15.0 * inv2**3
    return -x * x / 2.0 - math.log(-x) - 0.5 * math.log(2.0 * math.pi) + math.log(series)


def gaussian_delta(epsilon: float, ratio: float) -> float:
    """δ(ε) of the Gaussian mechanism, ratio = sensitivity Δ / noise std σ (Balle & Wang, Theorem 8).

    The second term is e^ε·Φ(b) computed as exp(ε + log Φ(b)): with a large ratio Φ(b) underflows while
    e^ε·Φ(b) is as large as the first term, and dropping it would overstate δ (and so ε).
    """
    a = ratio / 2.0 - epsilon / ratio
    b = -ratio / 2.0 - epsilon / ratio
    return math.exp(_log_phi(a)) - math.exp(epsilon + _log_phi(b))


def gaussian_epsilon(noise_std: float, sensitivity: float, delta: float = DEFAULT_DELTA) -> float:
    """Smallest ε making the Gaussian mechanism (std `noise_std`, L2 `sensitivity`) (ε, δ)-DP; inf if σ=0.

    The analytic Gaussian mechanism (Balle & Wang, ICML 2018), found by bisection on the exact δ(ε).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if noise_std <= 0:
        return math.inf
    ratio = sensitivity / noise_std
    low, high = 0.0, 1.0
    while gaussian_delta(high, ratio) > delta:
        high *= 2
        if high > 1e6:
            return math.inf
    for _ in range(100):
        mid = (low + high) / 2
        low, high = (mid, high) if gaussian_delta(mid, ratio) > delta else (low, mid)
    return high


def activation_epsilon(activation_noise: float, hidden_size: int, delta: float = DEFAULT_DELTA) -> float:
    """ε of one h0 vector under `PrivacySpec.activation_noise` m on a model of this hidden size (inf: off)."""
    if activation_noise <= 0:
        return math.inf
    return gaussian_epsilon(activation_noise / math.sqrt(hidden_size), 2.0, delta)


def hidden_size_hint(model_ref: str) -> int | None:
    """The model's hidden size without loading torch: built-in refs, or config.json of a local directory or
    of a hub id in the local Hugging Face cache; None when none of these says."""
    if model_ref.startswith("tiny:"):
        return TINY_HIDDEN_SIZE
    if model_ref.lower() in KNOWN_HIDDEN_SIZES:
        return KNOWN_HIDDEN_SIZES[model_ref.lower()]
    config_path = Path(model_ref).expanduser() / "config.json"
    if not config_path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model_ref, "config.json")
        except Exception:  # not a hub id at all (e.g. a path that does not exist)
            return None
        if not isinstance(cached, str):
            return None
        config_path = Path(cached)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    size = config.get("hidden_size", config.get("n_embd"))
    return int(size) if isinstance(size, int) and size > 0 else None


def describe_activation_noise(
    activation_noise: float, activation_clip: float, hidden_size: int | None
) -> str:
    """One line for consent texts: what is clipped, how much noise, and ε (δ = 1e-5) per h0 vector."""
    if activation_noise <= 0:
        return "no noise on the hidden states"
    text = (
        f"each token's hidden state clipped to {activation_clip:g} x the public reference norm, then "
        f"Gaussian noise of norm about {activation_noise:g} x the clip norm"
    )
    if hidden_size is None:
        return text + " (ε unknown: the model's hidden size is not known here)"
    epsilon = activation_epsilon(activation_noise, hidden_size)
    return text + (
        f"; ε = {epsilon:.3g} per hidden-state vector (δ = {DELTA_TEXT}, hidden size {hidden_size})"
    )
