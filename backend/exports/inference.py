"""The caller's half of generation for the API, in the backend process (imports torch; loaded only by the
generate route): front and back with the job's client adapters, the body through a `BodyTransport` to a
worker's generation session (`backend.exports.sessions.run_body`).

The front and back of the newest bundle of a job are kept (one job at a time) so repeated requests do not
reload them; a new checkpoint or client average changes the bundle and reloads them.
"""

from __future__ import annotations

import hashlib
import threading

from backend.exports.schemas import GenerateRequest
from flglm.export import client_parts_from_bundle, read_export_bundle
from flglm.generation import BodyTransport, RemoteBody, SamplingConfig, generate_through_split
from flglm.models import load_tokenizer
from flglm.split import SplitModel

_lock = threading.Lock()  # one generation at a time: the parts' modules are shared, the CPU is too
_loaded: dict[str, tuple[SplitModel, str]] = {}  # bundle digest -> (front + back, model ref)


def _client_parts_for(bundle: bytes) -> tuple[SplitModel, str]:
    digest = hashlib.sha256(bundle).hexdigest()
    if digest not in _loaded:
        parsed = read_export_bundle(bundle)
        _loaded.clear()
        _loaded[digest] = (client_parts_from_bundle(parsed), parsed.model_ref)
    return _loaded[digest]


def complete_prompts(bundle: bytes, request: GenerateRequest, body_transport: BodyTransport) -> list[str]:
    """The completion (new text only) of each prompt; the body runs wherever `body_transport` sends it."""
    sampling = SamplingConfig(
        request.max_new_tokens, request.do_sample, request.temperature, request.top_k, request.seed
    )
    with _lock:
        split, model_ref = _client_parts_for(bundle)
        tokenizer = load_tokenizer(model_ref)
        tokenizer.padding_side = "left"
        encoded = tokenizer(request.prompts, return_tensors="pt", padding=True)
        sequences = generate_through_split(
            split,
            encoded["input_ids"],
            encoded["attention_mask"],
            sampling,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id or 0,
            body_step=RemoteBody(body_transport),
        )
    new_tokens = sequences[:, encoded["input_ids"].shape[1] :]  # (batch, new)
    return list(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
