"""Generation sessions on the worker: calls equal the in-process body; idle TTL, LRU cap, typed refusals."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from flglm.adapters import AdapterSpec, add_split_adapters, trainable_state_dict
from flglm.contracts.blob_store import InMemoryBlobStore
from flglm.contracts.refusals import UnknownGenerationSession
from flglm.contracts.tasks import BODY_GENERATE, BODY_GENERATE_CLOSE, BODY_GENERATE_OPEN, raise_if_rejected
from flglm.generation import LocalBody, decode_body_output, encode_body_input
from flglm.models import load_model
from flglm.split import SplitModel, SplitPlan, split_model
from flglm.wire.keys import generate_private_key
from worker.checkpoints import ReplicaSnapshot, replica_dir, save_snapshot
from worker.executor import call_task
from worker.generation import GenerationSessions
from worker.runtime import WorkerRuntime

HIDDEN = 32  # tiny:llama
# The worker runs the body on its GPU when it has one: cover that path wherever a GPU is present.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def trained_split() -> SplitModel:
    split = add_split_adapters(split_model(load_model("tiny:llama"), SplitPlan(1, 1)), AdapterSpec(r=8), 0)
    with torch.no_grad():
        for parameter in split.part("body").parameters():
            if parameter.requires_grad:
                parameter.normal_(0, 0.3)
    return split


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def split() -> SplitModel:
    return trained_split()


@pytest.fixture
def checkpoint_dir(tmp_path: Path, split: SplitModel) -> Path:
    snapshot = ReplicaSnapshot(3, trainable_state_dict(split.part("body")), {}, [], {}, [], [])
    save_snapshot(replica_dir(tmp_path / "job-1", 0), snapshot)
    return tmp_path / "job-1"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=DEVICES)
def runtime(clock: Clock, request: pytest.FixtureRequest) -> WorkerRuntime:
    device = torch.device(request.param)
    runtime = WorkerRuntime(InMemoryBlobStore(), generate_private_key(), lambda *_: None, device)
    runtime.generation = GenerationSessions(device, idle_ttl_s=60, max_sessions=2, clock=clock)
    return runtime


def open_session(runtime: WorkerRuntime, checkpoint_dir: Path, session_id: str) -> dict[str, Any]:
    kwargs = {
        "job_id": 1,
        "session_id": session_id,
        "model_ref": "tiny:llama",
        "split_plan": {"front_layers": 1, "back_layers": 1},
        "adapter": {"kind": "lora", "r": 8, "alpha": 16},
        "checkpoint_dir": str(checkpoint_dir),
    }
    return call_task(runtime, BODY_GENERATE_OPEN, kwargs)


def body_call(runtime: WorkerRuntime, session_id: str, hidden: torch.Tensor, mask: torch.Tensor) -> Any:
    """The body's output tensor, or the task's JSON refusal."""
    call = uuid.uuid4().hex
    keys = {"input_key": f"in-{call}", "output_key": f"out-{call}"}
    runtime.store.put_if_absent(keys["input_key"], encode_body_input(hidden, mask), 60)
    result = call_task(runtime, BODY_GENERATE, {"job_id": 1, "session_id": session_id, **keys})
    if result.get("status") == "rejected":
        return result
    output = runtime.store.get(result["output_key"])
    assert output is not None
    return decode_body_output(output, hidden)


def test_sessions_share_the_body_and_keep_their_own_caches(
    runtime: WorkerRuntime, checkpoint_dir: Path, split: SplitModel
) -> None:
    opened = open_session(runtime, checkpoint_dir, "a")
    assert opened["hidden_size"] == HIDDEN and opened["server_checkpoint"] == "step-0000000003.safetensors"
    open_session(runtime, checkpoint_dir, "b")
    assert runtime.generation.loaded_bodies() == 1
    generator = torch.Generator().manual_seed(0)
    prompt_a, prompt_b = (
        torch.randn(2, 5, HIDDEN, generator=generator),
        torch.randn(1, 3, HIDDEN, generator=generator),
    )
    mask_a = torch.ones(2, 5, dtype=torch.long)
    mask_a[0, :2] = 0  # a left-padded row
    reference_a = LocalBody(split.part("body").eval(), split.part("body").stack.config)
    with torch.no_grad():
        expected = reference_a(prompt_a, mask_a)  # (batch, seq, hidden)
    assert torch.allclose(body_call(runtime, "a", prompt_a, mask_a), expected, atol=1e-4)
    # Session b's call in between leaves a's cache alone.
    assert body_call(runtime, "b", prompt_b, torch.ones(1, 3, dtype=torch.long)).shape == (1, 3, HIDDEN)
    step, mask_a = (
        torch.randn(2, 1, HIDDEN, generator=generator),
        torch.cat([mask_a, torch.ones(2, 1, dtype=torch.long)], 1),
    )
    with torch.no_grad():
        expected = reference_a(step, mask_a)
    assert torch.allclose(body_call(runtime, "a", step, mask_a), expected, atol=1e-4)
    # A repeated call (its mask no longer continues the cache) and another batch size are refused.
    assert body_call(runtime, "a", step, mask_a)["code"] == "generation_out_of_order"
    other_batch = body_call(runtime, "a", step[:1], torch.ones(1, mask_a.shape[1] + 1, dtype=torch.long))
    assert other_batch["code"] == "generation_out_of_order"
    wrong = body_call(runtime, "a", torch.randn(2, 1, HIDDEN + 1), torch.cat([mask_a, mask_a[:, :1]], 1))
    assert wrong["code"] == "wrong_tensor" and wrong["http_status"] == 422
    missing = call_task(
        runtime, BODY_GENERATE, {"job_id": 1, "session_id": "a", "input_key": "x", "output_key": "y"}
    )
    assert missing["code"] == "missing_message"


def test_idle_sessions_expire_and_the_cap_evicts_the_least_recently_used(
    runtime: WorkerRuntime, checkpoint_dir: Path, clock: Clock
) -> None:
    for session_id in ("a", "b"):
        open_session(runtime, checkpoint_dir, session_id)
        clock.now += 1
    runtime.generation.get(1, "a")  # a is now the most recently used
    open_session(runtime, checkpoint_dir, "c")  # a third session beyond the cap of 2 evicts b
    assert runtime.generation.open_sessions() == [(1, "a"), (1, "c")]
    refused = body_call(runtime, "b", torch.randn(1, 1, HIDDEN), torch.ones(1, 1, dtype=torch.long))
    assert refused["code"] == "unknown_generation_session" and refused["http_status"] == 404
    with pytest.raises(UnknownGenerationSession, match="evicted by newer sessions"):
        raise_if_rejected(refused)
    assert call_task(runtime, BODY_GENERATE_CLOSE, {"job_id": 1, "session_id": "c"}) == {"closed": True}
    assert call_task(runtime, BODY_GENERATE_CLOSE, {"job_id": 1, "session_id": "c"}) == {"closed": False}
    assert runtime.generation.loaded_bodies() == 1  # still used by a
    clock.now += 59
    assert runtime.generation.open_sessions() == [(1, "a")]
    clock.now += 1  # a's idle TTL of 60 s has passed: it and its body are dropped
    assert runtime.generation.open_sessions() == []
    assert runtime.generation.loaded_bodies() == 0
    # A session of another job with the same id is another session.
    open_session(runtime, checkpoint_dir, "a")
    closed = call_task(runtime, BODY_GENERATE_CLOSE, {"job_id": 2, "session_id": "a"})
    assert closed == {"closed": False}


def test_a_job_without_a_server_checkpoint_is_refused(runtime: WorkerRuntime, tmp_path: Path) -> None:
    refused = open_session(runtime, tmp_path / "nothing-here", "a")
    assert refused["code"] == "no_server_checkpoint" and refused["http_status"] == 409
