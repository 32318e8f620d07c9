"""`flglm job export` (the trained model as a PEFT adapter / merged weights) and `flglm generate`.

Both download the job's adapter bundle (`GET /jobs/{id}/export`, admin) or read one saved with `--bundle`.
`generate` runs the split with a KV cache in every part (see flglm.generation): front and back in this
process from the bundle's client adapters, the body on a worker through a generation session
(`flglm.generation_client`, closed at the end, also on error). `--bundle` (offline, no server) and
`--local-body` run the body in this process too; it prints each completion under its prompt, control
characters escaped. torch is imported only when a command runs.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path
from typing import Annotated

import typer

from apps.cli.operator import DEFAULT_SERVER, CaCert, Server, Token, call_api, job_app

_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned; line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})

BundleFile = Annotated[
    Path | None,
    typer.Option("--bundle", exists=True, dir_okay=False, help="a saved export bundle instead of the server"),
]


def fetch_bundle(job_id: int, bundle: Path | None, server: str, token: str, ca_cert: Path | None) -> bytes:
    if bundle is not None:
        return bundle.read_bytes()
    data: bytes = call_api("GET", f"/jobs/{job_id}/export", server, token, ca_cert, raw=True)
    return data


@job_app.command("export")
def export(
    job_id: int,
    out: Annotated[Path, typer.Option("--out", help="directory for the PEFT adapter (created)")],
    merge: Annotated[
        bool, typer.Option("--merge", help="also write merged full weights to OUT/merged")
    ] = False,
    save_bundle: Annotated[
        bool, typer.Option(help="keep the raw bundle as OUT/flglm-bundle.safetensors")
    ] = True,
    bundle: BundleFile = None,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """Write JOB's adapters (all three parts) as a standard PEFT adapter dir of the unsplit model.

    A private_front job's input-block adapters stay with its data owners: its export has the public input
    block, and a note says so."""
    from flglm.export import export_peft_adapter, read_export_bundle

    data = fetch_bundle(job_id, bundle, server, token, ca_cert)
    try:
        parsed = read_export_bundle(data)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    written = export_peft_adapter(
        parsed.model_ref,
        parsed.plan,
        parsed.adapter_cfg,
        parsed.front_back_state,
        parsed.body_state,
        out,
        merge,
    )
    if save_bundle:
        (written / "flglm-bundle.safetensors").write_bytes(data)
    if parsed.note:
        typer.echo(f"note: {parsed.note}", err=True)
    typer.echo(str(written))


LocalBodyFlag = Annotated[
    bool,
    typer.Option(
        "--local-body", help="run the body in this process too (the server only exports the bundle)"
    ),
]


def generate(
    job_id: int,
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="a prompt (repeat for a batch)")],
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    do_sample: Annotated[bool, typer.Option("--sample/--greedy", help="sample instead of greedy")] = False,
    temperature: Annotated[float, typer.Option(help="> 0; with --sample")] = 1.0,
    top_k: Annotated[int, typer.Option(min=0)] = 0,
    seed: int = 0,
    bundle: BundleFile = None,
    local_body: LocalBodyFlag = False,
    server: Server = DEFAULT_SERVER,
    token: Token = "",
    ca_cert: CaCert = None,
) -> None:
    """Generate a completion of each PROMPT with JOB's trained adapters, through the split model.

    Front and back run here; the body runs on a worker through a generation session (closed at the end),
    unless --bundle (offline) or --local-body runs it here too.
    """
    from flglm.export import client_parts_from_bundle, read_export_bundle, split_from_bundle
    from flglm.generation import RemoteBody, SamplingConfig, complete_texts
    from flglm.generation_client import GenerationApiError, GenerationSessionClient
    from flglm.models import load_tokenizer

    try:
        sampling = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, seed)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    data = fetch_bundle(job_id, bundle, server, token, ca_cert)
    try:
        parsed = read_export_bundle(data)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    tokenizer = load_tokenizer(parsed.model_ref)
    if bundle is not None or local_body:
        completions = complete_texts(split_from_bundle(parsed), tokenizer, prompt, sampling)
    else:
        try:
            with GenerationSessionClient(server, token, job_id, ca_cert) as remote:
                remote.open()
                body = RemoteBody(remote.run_body)
                completions = complete_texts(
                    client_parts_from_bundle(parsed), tokenizer, prompt, sampling, body
                )
        except GenerationApiError as exc:
            typer.echo(f"error {exc.code}: {exc.message}", err=True)
            raise typer.Exit(1) from None
    typer.echo(labelled_completions(prompt, completions), nl=False)


def escape_text(text: str) -> str:
    """`text` on one line: control and invisible characters escaped (`\\n`, `\\x1b`), backslashes doubled."""
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[char])
        elif unicodedata.category(char) in _HIDDEN_CATEGORIES:
            code = ord(char)
            out.append(
                f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
            )
        else:
            out.append(char)
    return "".join(out)


def labelled_completions(prompts: list[str], completions: list[str]) -> str:
    """Each completion under the prompt it continues, both escaped (`escape_text`)."""
    return "".join(
        f"prompt {number}: {escape_text(prompt)}\n  completion: {escape_text(text)}\n"
        for number, (prompt, text) in enumerate(zip(prompts, completions, strict=True), start=1)
    )
