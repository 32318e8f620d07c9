"""The `flglm bench memory --plot FILE` figure: every process's resident memory over the job's steps."""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

MIB = 2**20


def plot_memory(result: dict[str, Any], path: Path) -> None:
    """RSS (MiB) of each process against the training step it was sampled at (client steps reported so far,
    per agent), with the evaluations shaded, as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    progress = result["progress"]
    agents = max(1, int(result["config"]["agents"]))
    times = [t for t, _ in progress]

    def step_at(t: float) -> float | None:
        index = bisect.bisect_right(times, t) - 1
        return None if index < 0 else progress[index][1] / agents

    figure, axis = plt.subplots(figsize=(9, 4.8))
    for name, samples in result["samples"].items():
        points = [(step_at(t), rss / MIB) for t, rss in samples]
        kept = [(s, m) for s, m in points if s is not None]
        if kept:
            axis.plot([s for s, _ in kept], [m for _, m in kept], label=name, linewidth=1.2)
    for events in result["events"].values():
        starts = [e["t"] for e in events if e["event"] == "eval_start"]
        ends = [e["t"] for e in events if e["event"] == "eval_end"]
        for start, end in zip(starts, ends, strict=False):
            a, b = step_at(start), step_at(end)
            if a is not None and b is not None:
                axis.axvspan(a, b + 0.3, color="0.85", zorder=0)
    config = result["config"]
    axis.set_xlabel("training steps done (per client); grey: evaluation after FedAvg")
    axis.set_ylabel("resident memory (MiB)")
    axis.set_title(
        f"flglm bench memory: {config['model_ref']}, {config['agents']} agents, "
        f"batch {config['batch_size']}, "
        f"executor {config['executor']}"
    )
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
