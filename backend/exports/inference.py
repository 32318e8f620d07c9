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
from flglm.generation import BodyTransport, RemoteBody, SamplingConfig, complete_texts
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
        return complete_texts(
            split, load_tokenizer(model_ref), request.prompts, sampling, RemoteBody(body_transport)
        )
