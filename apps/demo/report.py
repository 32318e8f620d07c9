"""The demo's results: a console table, a Markdown report and a PNG of the training loss curves."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROWS = (
    ("zero_shot", "zero-shot (base model)"),
    ("centralized", "centralized LoRA"),
    ("federated", "FL-GLM federated"),
)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def _bytes(value: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def result_rows(results: dict[str, Any]) -> list[list[str]]:
    """Header + one row per model: accuracy ± 95 % CI, eval loss, training wall time, bytes on the wire."""
    rows = [["model", "accuracy % [95 % CI]", "eval loss", "train wall s", "bytes on the wire"]]
    for key, title in ROWS:
        r = results[key]
        wire = (
            _bytes(r["wire_bytes"])
            if key == "federated"
            else "0 (data pooled)"
            if key == "centralized"
            else "-"
        )
        rows.append(
            [
                title,
                f"{_percent(r['accuracy'])} "
                f"[{_percent(r['accuracy_ci_low'])}, {_percent(r['accuracy_ci_high'])}]",
                f"{r['eval_loss']:.3f}",
                f"{r['train_wall_s']:.0f}" if r.get("train_wall_s") else "-",
                wire,
            ]
        )
    return rows


def audit_rows(audit: dict[str, Any]) -> list[list[str]]:
    """Header + one row per attack of the demo's privacy audit (PrivacyAudit JSON), the strongest marked."""
    rows = [["attack", "token recovery % [95 % CI]", "exact sequences %", "ROUGE-L"]]
    for result in audit["attacks"]:
        low, high = result["token_recovery_ci"]
        mark = " (strongest)" if result["attack"] == audit["strongest_attack"] else ""
        rows.append(
            [
                result["attack"] + mark,
                f"{_percent(result['token_recovery'])} [{_percent(low)}, {_percent(high)}]",
                _percent(result["exact_sequences"]),
                f"{result['rouge_l']:.3f}",
            ]
        )
    epsilon = audit["activation_epsilon"]
    rows.append(
        [
            "activation noise (ε, δ)",
            "no noise: no guarantee" if epsilon is None else f"ε = {epsilon:.3g}, δ = 1e-5 per h0 vector",
            "",
            "",
        ]
    )
    return rows


def audit_section(results: dict[str, Any]) -> str:
    """The report's privacy section: the audit's table and what its figures mean (or why there is none)."""
    audit = results.get("privacy_audit")
    if audit is None:
        why = results.get("privacy_audit_error")
        return f"Not run ({why})." if why else "Not run (`--no-audit`)."
    sequences = max((a["sequences"] for a in audit["attacks"]), default=audit["request"]["sequences"])
    return f"""{markdown_table(audit_rows(audit))}

What the figures mean: the share of training tokens a curious server reads back from what it receives at the
first step under this job's settings ({sequences} sequences x {audit["request"]["seq_len"]} tokens; text:
{audit["text_source"]}; 95 % Wilson intervals). The gradient attack's figure is next-token recovery where the
client trains on every next token; a classification job like this one exposes its label tokens that way."""


def format_table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def plot_losses(results: dict[str, Any], path: Path) -> Path:
    """Training loss per step: each federated client, the federated mean, and the centralized run."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fed = results["federated"]
    steps_per_round = results["steps_per_round"]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    by_client: dict[str, list[tuple[int, float]]] = {}
    for entry in fed["step_losses"]:
        global_step = (entry["round"] - 1) * steps_per_round + entry["step"] + 1
        by_client.setdefault(entry["client"], []).append((global_step, entry["loss"]))
    for client, points in sorted(by_client.items()):
        points.sort()
        ax.plot(*zip(*points, strict=True), alpha=0.45, linewidth=1, label=f"federated: {client}")
    mean: dict[int, list[float]] = {}
    for points in by_client.values():
        for step, loss in points:
            mean.setdefault(step, []).append(loss)
    xs = sorted(mean)
    ax.plot(
        xs, [sum(mean[x]) / len(mean[x]) for x in xs], color="black", linewidth=2, label="federated: mean"
    )
    central = results["centralized"]["losses"]
    ax.plot(range(1, len(central) + 1), central, color="tab:red", linewidth=2, label="centralized")
    for boundary in range(steps_per_round, len(central), steps_per_round):
        ax.axvline(boundary + 0.5, color="grey", linestyle=":", linewidth=0.8)
    ax.set_xlabel("optimizer step (dotted: FedAvg at the end of a round)")
    ax.set_ylabel("training loss (label tokens)")
    ax.set_title(f"{results['model']}: training loss, {results['skew']} partition, seed {results['seed']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _private_front_note(results: dict[str, Any]) -> str:
    if not results.get("privacy", {}).get("private_front"):
        return "."
    per_client = results["federated"].get("per_client", {})
    scores = ", ".join(f"{name} {_percent(s['accuracy'])}" for name, s in per_client.items())
    return (
        ". Each client kept a private input block, so the federated row is the mean over the clients' own "
        f"models (their input block + the averaged output block and server body): {scores}; its interval "
        "spans every client's interval."
    )


def write_report(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write `report.md` and `loss_curves.png` under `out_dir`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_losses(results, out_dir / "loss_curves.png")
    fed, central = results["federated"], results["centralized"]
    gap = 100 * (central["accuracy"] - fed["accuracy"])
    histogram = "\n".join(
        f"| {name} | {sum(counts.values())} | "
        + ", ".join(f"{label} {n}" for label, n in counts.items() if n)
        + " |"
        for name, counts in results["client_label_counts"].items()
    )
    r = results
    text = f"""# FL-GLM demo report

Model `{r["model"]}`, split {r["split"]} (client: embeddings + the first block(s), last block + head;
server: the rest), LoRA r={r["lora_r"]} on every linear layer of every part.
Privacy settings: `{json.dumps(r.get("privacy", {}), sort_keys=True)}`{_private_front_note(r)}
Task: {len(r["labels"])}-way classification verbalised as generation ("which outlet published this?"),
scored by the summed log-probability of each label's tokens.
Seed {r["seed"]}; {r["clients"]} clients, `{r["skew"]}` partition.

{markdown_table(result_rows(r))}

Eval set: {r["eval_examples"]} held-out examples (balanced; the same for every model); the interval is
the 95 % Wilson interval. Federated minus centralized: {-gap:+.1f} points.

**Step budget.** Federated: {r["rounds"]} rounds x {r["steps_per_round"]} steps; at every step each
client trains on {r["batch_size_per_client"]} examples and the server body takes one optimizer step on
the {r["centralized_batch_size"]} concatenated rows (client_batch); client adapters are FedAvg'd after
each round. Centralized: {r["steps"]} optimizer steps of {r["centralized_batch_size"]} examples from the
union of the clients' data: the same examples seen, the same number of updates and the same schedule
(AdamW lr {r["lr"]}, warm-up {r["warmup_steps"]} steps then linear decay; bf16 autocast:
{r["bf16_autocast"]}).

**Wire.** Federated traffic (agent <-> control plane: encrypted activations, gradients and adapters, as
counted by the agents): {_bytes(fed["wire_bytes_up"])} up, {_bytes(fed["wire_bytes_down"])} down
(wire dtype {r["wire_dtype"]}).

**Wall time.** Zero-shot eval {r["zero_shot"]["eval_wall_s"]:.0f} s; centralized training
{central["train_wall_s"]:.0f} s; federated job {fed["train_wall_s"]:.0f} s (server + 3 agents on this
machine); whole demo {r["total_wall_s"]:.0f} s; load average at the end {r["load_average"]}.

## Data per client

| client | examples | labels |
|---|---|---|
{histogram}

## Loss curves

![training loss]({png.name})

## Privacy audit of this job

{audit_section(r)}
"""
    md = out_dir / "report.md"
    md.write_text(text, encoding="utf-8")
    return md, png
