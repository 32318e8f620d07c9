"""`flglm privacy audit`: what a curious server recovers of the training text under given settings, run here
(`--model ...`) or as an audit of a job's own settings on the control plane (`--job ID --server ...`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from flglm.cli.operator import DEFAULT_SERVER, CaCert, Server, Token, call_api
from flglm.privacy.report import AuditRequest, PrivacyAudit

app = typer.Typer(help="Privacy audits: attack what the server receives.", no_args_is_help=True)

POLL_S = 2.0
ATTACKS_HELP = "comma-separated: known_weights_inversion, learned_inverter, gradient_next_token (default all)"
# Options that set the audited settings: a job's audit takes them from the job, never from here.
SETTINGS_OPTIONS = (
    "model",
    "front_layers",
    "back_layers",
    "adapter_r",
    "adapter_alpha",
    "wire_dtype",
    "activation_noise",
    "activation_clip",
    "gradient_noise",
    "private_front",
    "private_init_scale",
    "decorrelation",
)


def read_texts(path: Path) -> list[str]:
    """Texts to attack: `.txt`, one per non-empty line; `.jsonl`, one per line as a JSON string or an object
    with `text` (classification data) or `prompt` and `completion` (generation data, joined)."""
    if not path.is_file():
        raise typer.BadParameter(f"{path}: not a file", param_hint="--texts")
    try:
        content = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise typer.BadParameter(f"{path}: not valid UTF-8", param_hint="--texts") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        texts = [line.strip() for line in content.split("\n") if line.strip()]
    elif suffix == ".jsonl":
        texts = [
            _jsonl_text(path, number, line)
            for number, line in enumerate(content.split("\n"), start=1)
            if line.strip()
        ]
    else:
        raise typer.BadParameter(f"{path}: use a .txt or .jsonl file", param_hint="--texts")
    if not texts:
        raise typer.BadParameter(f"{path}: no texts in the file", param_hint="--texts")
    return texts


def _jsonl_text(path: Path, number: int, line: str) -> str:
    where = f"{path}:{number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{where}: invalid JSON ({exc.msg})", param_hint="--texts") from None
    if isinstance(row, str):
        text = row
    elif isinstance(row, dict) and isinstance(row.get("text"), str):
        text = row["text"]
    elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
        text = row["prompt"] + (row["completion"] if isinstance(row.get("completion"), str) else "")
    else:
        raise typer.BadParameter(
            f'{where}: expected a JSON string or an object with a "text" or "prompt" field',
            param_hint="--texts",
        )
    if not text.strip():
        raise typer.BadParameter(f"{where}: empty text", param_hint="--texts")
    return text


def parse_attacks(value: str | None) -> list[str] | None:
    return None if value is None else [name.strip() for name in value.split(",") if name.strip()]


class StageBars:
    """A tqdm bar on stderr per stage of the audit, replaced when the stage changes."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._stage: str | None = None
        self._bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        if stage != self._stage or self._bar is None:
            self.close()
            self._stage = stage
            self._bar = tqdm(total=max(total, 1), desc=stage, unit="", leave=False, dynamic_ncols=True)
        self._bar.total = max(total, 1)
        self._bar.n = min(done, self._bar.total)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def audit_table(audit: PrivacyAudit) -> str:
    """The report as a person reads it: one row per attack, the strongest marked, then (ε, δ)."""
    request, privacy = audit.request, audit.request.privacy
    split = request.split_plan
    private = (
        f"on (init scale {privacy.private_init_scale}, decorrelation {privacy.decorrelation})"
        if privacy.private_front
        else "off"
    )
    lines = [
        f"privacy audit of {request.model_ref}: input block {split.front_layers}, output block "
        f"{split.back_layers}, LoRA r={request.adapter_r} alpha={request.adapter_alpha}; "
        f"moment {audit.moment}",
        f"defences: wire {privacy.wire_dtype}, activation noise {privacy.activation_noise} "
        f"(clip {privacy.activation_clip}), gradient noise {privacy.gradient_noise}, private input block "
        f"{private}",
        f"text: {audit.text_source}; {request.sequences} sequences x {request.seq_len} tokens; "
        f"seed {request.seed}",
        "",
        f"  {'attack':<26}{'target':<8}{'token recovery [95 % CI]':>28}{'exact seq.':>12}{'ROUGE-L':>9}"
        f"{'tokens':>8}{'time':>9}",
    ]
    for result in audit.attacks:
        low, high = result.token_recovery_ci
        mark = "*" if result.attack == audit.strongest_attack else " "
        recovery = f"{100 * result.token_recovery:.1f} % [{100 * low:.1f}, {100 * high:.1f}]"
        exact = f"{100 * result.exact_sequences:.1f} %"
        lines.append(
            f"{mark} {result.attack:<26}{result.target:<8}{recovery:>28}{exact:>12}{result.rouge_l:>9.3f}"
            f"{result.tokens:>8}{result.wall_s:>8.1f}s"
        )
    if audit.strongest_attack is not None and audit.strongest_token_recovery is not None:
        share = 100 * audit.strongest_token_recovery
        lines.append(f"* strongest: {audit.strongest_attack}, {share:.1f} % of the attacked tokens recovered")
    epsilon = audit.activation_epsilon
    lines.append(
        "activation noise: none, so no (ε, δ) guarantee"
        if epsilon is None
        else f"activation noise: (ε = {epsilon:.3g}, δ = 1e-5) per h0 vector"
    )
    lines.append(f"audit wall time {audit.wall_s:.1f} s")
    return "\n".join(lines)


@app.command("audit")
def audit(
    ctx: typer.Context,
    model: Annotated[str | None, typer.Option(help="model ref or local HF directory [smollm2-135m]")] = None,
    front_layers: Annotated[int | None, typer.Option(min=1, help="blocks in the input block [1]")] = None,
    back_layers: Annotated[int | None, typer.Option(min=1, help="blocks in the output block [1]")] = None,
    adapter_r: Annotated[int | None, typer.Option(min=1, help="LoRA rank [8]")] = None,
    adapter_alpha: Annotated[int | None, typer.Option(min=1, help="LoRA alpha [16]")] = None,
    wire_dtype: Annotated[str | None, typer.Option(help="float32, float16 or bfloat16 [float32]")] = None,
    activation_noise: Annotated[float | None, typer.Option(help="noise on h0, x the clip norm [0]")] = None,
    activation_clip: Annotated[
        float | None, typer.Option(help="per-token clip of h0, x the public median norm [1]")
    ] = None,
    gradient_noise: Annotated[float | None, typer.Option(help="noise on dL/dh1, x its RMS [0]")] = None,
    private_front: Annotated[
        bool | None, typer.Option("--private-front/--public-front", help="private input-block adapters")
    ] = None,
    private_init_scale: Annotated[
        float | None, typer.Option(help="with --private-front: start this x ‖W‖ from public [0]")
    ] = None,
    decorrelation: Annotated[
        float | None, typer.Option(help="with --private-front: NoPeek weight [0]")
    ] = None,
    sequences: Annotated[int | None, typer.Option(help="sequences attacked [64]")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per sequence [64]")] = None,
    corpus: Annotated[str | None, typer.Option(help="built-in text: news or tweets [news]")] = None,
    texts: Annotated[
        Path | None, typer.Option("--texts", help="attack these texts instead: .txt (a line each) or .jsonl")
    ] = None,
    attacks: Annotated[str | None, typer.Option(help=ATTACKS_HELP)] = None,
    seed: Annotated[int | None, typer.Option(help="seed of the text choice and the attacks [0]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
    job: Annotated[
        int | None, typer.Option("--job", min=1, help="audit this job's settings on the server instead")
    ] = None,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="no progress bar")] = False,
) -> None:
    """Attack what the server receives at the first step: recovered tokens per attack, with a 95 % CI.

    Locally by default (the settings from the options); with --job, the server audits that job's own
    settings (as an admin may) and this command waits for it.
    """
    choices: dict[str, Any] = {
        "sequences": sequences,
        "seq_len": seq_len,
        "corpus": corpus,
        "texts": read_texts(texts) if texts is not None else None,
        "attacks": parse_attacks(attacks),
        "seed": seed,
    }
    choices = {name: value for name, value in choices.items() if value is not None}
    bars = StageBars(not no_progress)
    try:
        if job is not None:
            given = [
                f"--{name.replace('_', '-')}" for name in SETTINGS_OPTIONS if ctx.params.get(name) is not None
            ]
            if given:
                raise typer.BadParameter(
                    f"--job audits the job's own settings; drop {', '.join(given)}", param_hint="--job"
                )
            view = _remote(job, choices, server, token, ca_cert, bars)
            report = PrivacyAudit.model_validate(view["result"])
            output: dict[str, Any] = view
        else:
            report = _local(ctx.params, choices, bars)
            output = report.model_dump(mode="json")
    finally:
        bars.close()
    typer.echo(json.dumps(output) if as_json else audit_table(report))


def _local(params: dict[str, Any], choices: dict[str, Any], bars: StageBars) -> PrivacyAudit:
    privacy_fields = (
        "wire_dtype",
        "activation_noise",
        "activation_clip",
        "gradient_noise",
        "private_front",
        "private_init_scale",
        "decorrelation",
    )
    split = {"front_layers": params["front_layers"], "back_layers": params["back_layers"]}
    data: dict[str, Any] = {
        "model_ref": params["model"] or "smollm2-135m",
        "split_plan": {name: value for name, value in split.items() if value is not None},
        "privacy": {name: params[name] for name in privacy_fields if params[name] is not None},
        "adapter_r": params["adapter_r"],
        "adapter_alpha": params["adapter_alpha"],
        **choices,
    }
    try:
        request = AuditRequest.model_validate({k: v for k, v in data.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
            for error in exc.errors()
        )
        raise typer.BadParameter(problems) from None
    from flglm.privacy.audit import run_privacy_audit  # torch: only once the input is known to be good

    try:
        return run_privacy_audit(request, progress=bars)
    except (ValueError, OSError) as exc:  # an unknown model, too little text: say so, no traceback
        bars.close()
        typer.echo(f"error: the audit failed: {exc}", err=True)
        raise typer.Exit(1) from None


def _remote(
    job_id: int, choices: dict[str, Any], server: str, token: str, ca_cert: Path | None, bars: StageBars
) -> dict[str, Any]:
    """Start the audit of job `job_id` on the server and wait for it (Ctrl-C stops waiting, not the audit)."""
    path = f"/jobs/{job_id}/privacy-audits"
    started = call_api("POST", path, server, token, ca_cert, json=choices)
    typer.echo(f"privacy audit {started['id']} of job {job_id} queued; waiting for it", err=True)
    while True:
        view: dict[str, Any] = call_api("GET", f"{path}/{started['id']}", server, token, ca_cert)
        if view["status"] == "completed":
            return view
        if view["status"] == "failed":
            bars.close()
            typer.echo(f"error: privacy audit {view['id']} of job {job_id} failed: {view['error']}", err=True)
            raise typer.Exit(1)
        progress = view.get("progress")
        if progress:
            bars(progress["stage"], progress["done"], progress["total"])
        time.sleep(POLL_S)
