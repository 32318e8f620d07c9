"""Progress bars for `flglm agent run` (round, step, loss, tokens/s, ETA) and each round's eval metrics; quiet
mode prints nothing."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class RoundProgress:
    """One bar per round: `step/steps`, ETA from tqdm, loss and tokens/s in the postfix."""

    def __init__(
        self, job_id: int, round_number: int, rounds: int, steps: int, first_step: int, quiet: bool
    ) -> None:
        self._bar = tqdm(
            total=steps,
            initial=first_step,
            desc=f"job {job_id} round {round_number}/{rounds}",
            unit="step",
            disable=quiet,
            file=sys.stderr,
            dynamic_ncols=True,
        )
        self._started = time.monotonic()
        self._tokens = 0

    def step_done(self, loss: float, tokens: int) -> None:
        self._tokens += tokens
        elapsed = max(time.monotonic() - self._started, 1e-9)
        self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{self._tokens / elapsed:.0f}")
        self._bar.update(1)

    def close(self) -> None:
        self._bar.close()


def show_round_eval(job_id: int, round_number: int, metrics: dict[str, float], quiet: bool) -> None:
    """One line under the bars: the round's eval metrics of the global model (n = eval examples)."""
    if quiet:
        return
    shown = " ".join(f"{name}={value:.4f}" for name, value in metrics.items() if name != "eval_examples")
    tqdm.write(
        f"job {job_id} round {round_number} eval (n={metrics.get('eval_examples', 0):.0f}): {shown}",
        file=sys.stderr,
    )


def show_notice(message: str, quiet: bool) -> None:
    """One line for the data owner under the bars (e.g. a job waiting for approval); nothing when quiet."""
    if not quiet:
        tqdm.write(message, file=sys.stderr)
