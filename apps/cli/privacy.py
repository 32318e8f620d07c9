"""`flglm privacy audit`: what a curious server recovers of the training text under given settings, run here
(`--model ...`) or as an audit of a job's own settings on the control plane (`--job ID --server ...`);
`flglm privacy frontier`: each defence's audit beside its accuracy on the demo task, as a table and a plot."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from apps.cli.operator import DEFAULT_SERVER, CaCert, Server, Token, call_api
from flglm.privacy.progress import StageBars
from flglm.privacy.report import AuditRequest, PrivacyAudit
from flglm.protocol import PrivacySpec

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
    privacy_fields = PrivacySpec.model_fields  # every privacy setting is one CLI option of the same name
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
        raise typer.BadParameter(_problems(exc)) from None
    from flglm.privacy.audit import run_privacy_audit  # torch: only once the input is known to be good

    try:
        return run_privacy_audit(request, progress=bars)
    except (ValueError, OSError) as exc:  # an unknown model, too little text: say so, no traceback
        bars.close()
        typer.echo(f"error: the audit failed: {exc}", err=True)
        raise typer.Exit(1) from None


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'settings'}: {error['msg']}"
        for error in exc.errors()
    )


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


def parse_seeds(value: str) -> list[int]:
    parts = [part.strip() for part in value.split(",") if part.strip()]
    if not parts or not all(part.isdigit() for part in parts):
        raise typer.BadParameter(
            f"expected comma-separated integers >= 0, got {value!r}", param_hint="--seeds"
        )
    seeds = [int(part) for part in parts]
    if len(set(seeds)) != len(seeds):
        raise typer.BadParameter(f"a seed is repeated in {value!r}", param_hint="--seeds")
    return seeds


def _write_frontier(rows: list[dict[str, Any]], out: Path, complete: bool) -> dict[str, Any]:
    """frontier.json (after every row, so a stopped sweep keeps what it measured), then .md and .png."""
    from apps.privacy.frontier_table import frontier_report, frontier_summary

    out.mkdir(parents=True, exist_ok=True)
    summary = {**frontier_summary(rows), "complete": complete}
    files: dict[str, str | None] = {"json": str(out / "frontier.json"), "markdown": None, "png": None}
    if complete:
        scored = [row for row in rows if row["mean_accuracy"] is not None]
        baseline = summary["baseline_accuracy"]
        png: Path | None = None
        if baseline is not None and scored:
            from apps.privacy.frontier import plot_frontier

            model = rows[0]["audit"]["request"]["model_ref"]
            title = f"Privacy / utility frontier ({model}, demo task)"
            png = plot_frontier(scored, baseline, out / "frontier.png", title=title)
        markdown = out / "frontier.md"
        markdown.write_text(frontier_report(rows, png.name if png else None), encoding="utf-8")
        files.update(markdown=str(markdown), png=str(png) if png else None)
    summary["files"] = files
    (out / "frontier.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


@app.command("frontier")
def frontier(
    settings: Annotated[
        Path | None,
        typer.Option(
            "--settings",
            help="JSON/YAML list of {name, front_layers, privacy}; the first row is the undefended baseline "
            "[default: the README's settings, apps.privacy.frontier.DEFAULT_SETTINGS]",
        ),
    ] = None,
    seeds: Annotated[str, typer.Option(help="comma-separated training seeds per setting")] = "0,1,2",
    audit_sequences: Annotated[int, typer.Option(help="sequences attacked per setting")] = 64,
    audit_seq_len: Annotated[int, typer.Option(help="tokens per attacked sequence")] = 64,
    attacks: Annotated[str | None, typer.Option(help=ATTACKS_HELP)] = None,
    model: Annotated[str, typer.Option(help="model ref or local HF directory")] = "smollm2-135m",
    steps: Annotated[int, typer.Option(min=1, help="training steps per seed (the demo's 5 x 8)")] = 40,
    batch_size: Annotated[int, typer.Option(min=1, help="examples per step (the demo's 3 x 8)")] = 24,
    eval_per_label: Annotated[int, typer.Option(min=1, help="held-out examples per label")] = 50,
    max_words: Annotated[int, typer.Option(min=1, help="words kept of each article")] = 45,
    out: Annotated[Path, typer.Option("--out", help="where frontier.json, .md and .png go")] = Path(
        "artifacts/privacy-frontier"
    ),
    from_json: Annotated[
        list[Path] | None,
        typer.Option(
            "--from-json",
            help="merge rows measured before (frontier_row JSON, a list of rows or a frontier.json) instead "
            "of computing; more files may follow; with --settings those are computed and appended",
        ),
    ] = None,
    more_rows: Annotated[list[Path] | None, typer.Argument(hidden=True, metavar="[FILE...]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object as the last line")] = False,
) -> None:
    """Each defence's audited token recovery beside its accuracy on the demo task, and the accuracy it costs.

    Every setting is audited at the first step, then trained and scored with the defence in its path once
    per seed on the demo's data and budget. The first row is the baseline the cost is measured from.
    """
    from apps.privacy.frontier_table import FrontierInputError, load_rows, load_settings

    if more_rows and not from_json:
        files = ", ".join(map(str, more_rows))
        raise typer.BadParameter(f"unexpected files {files}: did you mean --from-json?")
    seed_list = parse_seeds(seeds)
    try:
        AuditRequest(
            model_ref=model,
            sequences=audit_sequences,
            seq_len=audit_seq_len,
            **({"attacks": parse_attacks(attacks)} if attacks is not None else {}),  # type: ignore[arg-type]
        )
    except ValidationError as exc:
        raise typer.BadParameter(_problems(exc)) from None
    rows: list[dict[str, Any]] = []
    try:
        for path in [*(from_json or []), *(more_rows or [])]:
            rows.extend(load_rows(path))
    except FrontierInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--from-json") from None
    try:
        chosen = load_settings(settings) if settings is not None else None
    except FrontierInputError as exc:
        raise typer.BadParameter(str(exc), param_hint="--settings") from None
    names = [row["setting"] for row in rows] + [s.name for s in chosen or []]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise typer.BadParameter(f"setting names repeat across the rows: {', '.join(repeated)}")

    from apps.privacy.frontier import DEFAULT_SETTINGS, DefenceSetting, frontier_row

    to_run = (
        [DefenceSetting(s.name, s.front_layers, s.privacy) for s in chosen]
        if chosen is not None
        else []
        if from_json
        else list(DEFAULT_SETTINGS)
    )

    def say(message: str) -> None:
        typer.echo(message, err=True)

    import tempfile

    with tempfile.TemporaryDirectory(prefix="flglm-frontier-") as work:
        for number, setting in enumerate(to_run, start=1):
            say(f"[{number}/{len(to_run)}] {setting.name}")
            try:
                row = frontier_row(
                    setting,
                    seed_list,
                    Path(work),
                    audit_sequences=audit_sequences,
                    audit_seq_len=audit_seq_len,
                    model_ref=model,
                    progress=say,
                    steps=steps,
                    batch_size=batch_size,
                    eval_per_label=eval_per_label,
                    max_words=max_words,
                    attacks=parse_attacks(attacks),  # type: ignore[arg-type]
                )
            except (ValueError, OSError) as exc:  # an unknown model, too little text: say so, no traceback
                typer.echo(f"error: {setting.name}: {exc}", err=True)
                raise typer.Exit(1) from None
            rows.append(row)
            _write_frontier(rows, out, complete=False)
    summary = _write_frontier(rows, out, complete=True)
    say(f"frontier: {', '.join(path for path in summary['files'].values() if path)}")
    if as_json:
        typer.echo(json.dumps(summary))
    else:
        from apps.privacy.frontier_table import frontier_markdown

        typer.echo(frontier_markdown(rows))
