"""Offline loading: model refs, per-part loading that never touches the other parts' weights, SmolLM2."""

from __future__ import annotations

from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.models import (
    load_split_parts,
    load_tokenizer,
    parameter_bytes,
    part_parameter_bytes,
    resolve_model_ref,
)
from flglm.split import SplitModel, SplitPlan, position_ids_from_attention_mask, split_model
from flglm.tiny_models import build_tiny_model
from flglm.trainers import SplitTrainer, TrainConfig, tokenize_lm_batch


def compose(client: SplitModel, worker: SplitModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Run the client's and the worker's parts, loaded in separate SplitModels, as one model."""
    h = worker.part("body")(client.part("front")(ids, mask), mask)
    return client.part("back")(h, mask)  # (batch, seq, vocab)


def no_meta(split: SplitModel) -> bool:
    return all(t.device.type != "meta" for t in split.as_module_dict().state_dict().values())


def test_tiny_refs_resolve_and_bad_refs_are_clear() -> None:
    assert resolve_model_ref("tiny:gpt2:3").tiny_seed == 3
    assert resolve_model_ref("tiny:llama").tiny_arch == "llama"
    for bad in ("tiny:nope", "tiny:llama:x", "tiny:llama:1:2"):
        with pytest.raises(ValueError, match="tiny"):
            resolve_model_ref(bad)
    with pytest.raises(ValueError, match="not tiny"):
        resolve_model_ref("no-such-org/no-such-model")


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])  # untied, tied, GPT-2 layout
def test_local_dir_parts_load_only_their_weights(arch: str, tmp_path: Path, make_batch) -> None:  # type: ignore[no-untyped-def]
    model = build_tiny_model(arch, seed=9)
    model.save_pretrained(tmp_path)
    plan = SplitPlan(front_layers=1, back_layers=1)
    client = load_split_parts(str(tmp_path), plan, parts={"front", "back"})
    worker = load_split_parts(str(tmp_path), plan, parts={"body"})
    assert client.body is None and worker.front is None and worker.back is None
    assert no_meta(client) and no_meta(worker)
    full = split_model(model, plan)
    # The client holds exactly the front and back tensors; the worker exactly the body's.
    assert part_parameter_bytes(client)["total"] == parameter_bytes(full.as_module_dict(["front", "back"]))
    assert part_parameter_bytes(worker)["total"] == parameter_bytes(full.part("body"))

    # Together they hold every parameter once (the rotary buffers are recomputed on each side).
    def numel(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    assert numel(client.as_module_dict()) + numel(worker.as_module_dict()) == numel(model)
    client_names = {n for n, _ in client.as_module_dict().named_parameters()}
    assert not any(n.startswith("body.") for n in client_names)
    batch = make_batch("left")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        expected = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_attention_mask(mask, ids.shape[1]),
        ).logits
        assert (compose(client, worker, ids, mask) - expected).abs().max().item() <= 1e-5
    if model.config.tie_word_embeddings:
        assert client.part("back").lm_head.weight is client.part("front").embed_tokens.weight


def test_cached_hub_id_loads_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real Hugging Face cache layout (models--org--name/snapshots/<rev>, refs/main), no network involved.
    revision = "0" * 40
    snapshot = tmp_path / "models--flglm--tiny-llama" / "snapshots" / revision
    build_tiny_model("llama", seed=2).save_pretrained(snapshot)
    (tmp_path / "models--flglm--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--flglm--tiny-llama" / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert resolve_model_ref("flglm/tiny-llama").directory == snapshot
    parts = load_split_parts("flglm/tiny-llama", parts={"body"})
    assert parts.body is not None and no_meta(parts)


def test_tiny_ref_parts_match_the_tiny_model() -> None:
    client = load_split_parts("tiny:gemma2:4")
    assert client.body is None and client.front is not None and client.back is not None
    full = split_model(build_tiny_model("gemma2", seed=4))
    got, expected = client.part("front").state_dict(), full.part("front").state_dict()
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ValueError, match="non-empty subset"):
        load_split_parts("tiny:llama", parts={"middle"})  # type: ignore[arg-type]
    assert load_tokenizer("tiny:llama").pad_token_id == 0


@pytest.mark.slow
def test_smollm2_loads_offline_client_without_body_and_trains_a_split_step() -> None:
    ref = "smollm2-135m"
    source = resolve_model_ref(ref)  # converts the bundled GGUF once, then reuses the cache
    assert source.directory is not None and (source.directory / "model.safetensors").is_file()
    assert "quantization_config" not in (source.directory / "config.json").read_text()
    client = load_split_parts(ref, parts={"front", "back"})
    worker = load_split_parts(ref, parts={"body"})
    config = source.directory / "config.json"
    assert config.is_file() and client.num_layers == 30
    assert no_meta(client) and no_meta(worker)
    names = {n for n, _ in client.as_module_dict().named_parameters()}
    # Only layer 0 (front) and layer 29 (back) have decoder layers on the client.
    assert len([n for n in names if n.endswith("input_layernorm.weight")]) == 2
    client_params = sum(p.numel() for p in client.as_module_dict().parameters())
    body_params = sum(p.numel() for p in worker.as_module_dict().parameters())
    layer_params = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576  # attention, MLP, 2 norms
    assert body_params == 28 * layer_params
    assert client_params == 49152 * 576 + 576 + 2 * layer_params  # tied embeddings/head, final norm
    assert client_params / (client_params + body_params) < 0.3  # the point of the split

    tokenizer = load_tokenizer(ref)
    batch = tokenize_lm_batch(tokenizer, ["The capital of France is Paris.", "Hello"], max_length=16)
    split = SplitModel(
        front=client.front, body=worker.body, back=client.back, plan=client.plan, num_layers=30
    )
    add_split_adapters(split, AdapterSpec(r=4), seed=0)
    trainer = SplitTrainer(split, TrainConfig(lr=1e-3))
    first = trainer.train_step(batch)
    assert 0.0 < first < 20.0
    assert trainer.train_step(batch) < first  # one step on the same batch lowers its loss


def test_safetensors_are_read_into_the_asked_dtype_chunk_by_chunk(tmp_path: Path) -> None:
    """`read_safetensor` gives exactly what safetensors gives, converted from bf16 across chunk boundaries,
    and refuses a file that ends early or a dtype it does not know."""
    from safetensors.torch import load_file, save_file

    import flglm.models as models

    tensors = {"a": torch.randn(1000, 33).to(torch.bfloat16), "b": torch.arange(12, dtype=torch.int64)}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    header, start = models.safetensors_header(path)
    saved_chunk, models.READ_CHUNK_BYTES = models.READ_CHUNK_BYTES, 1000  # 500 bf16 values per chunk
    try:
        with path.open("rb") as reader:
            as_float = models.read_safetensor(reader, header["a"], start, torch.float32)
            as_stored = models.read_safetensor(reader, header["b"], start, torch.int64)
    finally:
        models.READ_CHUNK_BYTES = saved_chunk
    reference = load_file(str(path))
    assert torch.equal(as_float, reference["a"].float()) and torch.equal(as_stored, reference["b"])
    path.write_bytes(path.read_bytes()[: start + 10])  # truncated: only 10 bytes of data
    with path.open("rb") as reader, pytest.raises(ValueError, match="ends before"):
        models.read_safetensor(reader, header["b"], start, torch.int64)
    with path.open("rb") as reader, pytest.raises(ValueError, match="unsupported"):
        models.read_safetensor(reader, {**header["b"], "dtype": "F8_E4M3"}, start, torch.int64)


LOAD_PEAK = """
import json, sys
from flglm.models import load_split_parts, part_parameter_bytes
from flglm.process_memory import peak_resident_bytes, resident_bytes
from flglm.split import SplitPlan
import torch
torch.ones(1)
before = resident_bytes()
split = load_split_parts(sys.argv[1], SplitPlan(1, 1), parts={"front", "back"})
print(json.dumps({"rise": peak_resident_bytes() - before, "parts": part_parameter_bytes(split)["total"]}))
"""


def test_loading_a_part_peaks_at_its_own_size(tmp_path: Path) -> None:
    """The client parts of a model with a 64 MiB embedding load with the peak at about their size: reading
    through safetensors' mapping held the file's pages and the copy at once (about twice)."""
    import json
    import subprocess
    import sys

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32768, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    done = subprocess.run(
        [sys.executable, "-c", LOAD_PEAK, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["parts"] > 64 * 2**20
    assert figures["rise"] < 1.35 * figures["parts"], figures
