"""The step protocol through a live HTTPS uvicorn with the in-process executor (the embedded default).

Three data owners train a 2-round tiny-Llama job in each parallel mode with `run_client_step`; sequential
losses equal the in-process split step; after every round all owners hold the same FedAvg'd adapters.
Hostile uploads get a 4xx naming the problem, store nothing, and the next honest step still works.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

from backend.housekeeping import run_housekeeping
from backend.models import utc_now
from backend.settings import Settings
from backend.steps.relay import StepRelay
from flglm.agent_step import ClientChannel, run_client_eval_forward, run_client_step
from flglm.contracts.blob_store import InMemoryBlobStore
from flglm.step_client import StepConflict, StepHttpError
from flglm.step_messages import seal_activations, seal_hidden
from flglm.step_protocol import (
    STEP_MESSAGE_PATH,
    STEP_RESULT_PATH,
    MessageDirection,
    MessageRef,
    UploadReceipt,
)
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import (
    DataOwner,
    assert_job_has_its_own_key,
    client_states,
    enroll_owner,
    published_spec,
    reference_sequential_losses,
    server_public_key,
    start_job,
    train_concurrently,
    train_sequentially,
)
from tests.support.step_clients import client_batch

EXAMPLE_COUNTS = (10, 30, 60)
REPO = Path(__file__).resolve().parents[2]


def owners_of(api: Api, count: int = 3) -> list[DataOwner]:
    return [enroll_owner(api, f"owner-{i}", EXAMPLE_COUNTS[i]) for i in range(count)]


def assert_job_completed(api: Api, job_id: int) -> None:
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "completed", job
    rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
    assert [r["status"] for r in rounds] == ["closed", "closed"]


def assert_same_adapters(owners: list[DataOwner]) -> None:
    first, *others = client_states(owners)
    assert first, "the clients have no trainable adapters"
    for state in others:
        assert state.keys() == first.keys()
        assert all(torch.equal(state[name], first[name]) for name in first)


def test_sequential_job_over_https_equals_the_split_step(
    live_server: LiveServer, api: Api, settings: Settings
) -> None:
    owners = owners_of(api)
    job_id = start_job(api, owners, "sequential")
    key_file = assert_job_has_its_own_key(live_server, api, owners[0], job_id)
    train_sequentially(api, live_server, owners, job_id)  # steps, FedAvg and admission: the job's key
    assert_job_completed(api, job_id)
    assert_same_adapters(owners)
    runtime: StepRelay = live_server.app.state.step_relay
    expected = reference_sequential_losses(published_spec(runtime, job_id), owners)
    for owner, losses in zip(owners, expected, strict=True):
        assert len(owner.losses) == len(losses) == 4
        assert owner.losses == pytest.approx(losses, abs=1e-4)

    # Forward secrecy: once the retention after the end ran out, the key is gone and so is any upload.
    later = utc_now() + timedelta(seconds=settings.job_key_retention_s + 1)
    report = run_housekeeping(
        live_server.app.state.session_factory, later, 10 * settings.job_key_retention_s, key_file.parent
    )
    assert report.job_keys_deleted == [job_id] and not key_file.exists()
    owner = owners[0]
    channel = owner.channel(live_server, job_id, server_public_key(api, owner, job_id))
    batch = client_batch(owner.client_id, 5)
    with pytest.raises(StepHttpError) as gone, channel.client:
        run_client_eval_forward(owner.trainer, channel, 2, 0, batch["input_ids"], batch["attention_mask"])
    assert (gone.value.status, gone.value.code) == (410, "job_key_deleted")
    # Export and generation read plaintext checkpoints: no key needed.
    assert api.get(f"/jobs/{job_id}/export").status_code == 200
    answer = api.ok("POST", f"/jobs/{job_id}/generate", json={"prompts": ["hello"], "max_new_tokens": 2})
    assert len(answer["completions"]) == 1


@pytest.mark.parametrize(
    "mode, overrides",
    [
        ("client_batch", {}),
        ("server_hierarchical", {"replicas": 2}),
    ],
)
def test_parallel_modes_complete_over_https(
    live_server: LiveServer, api: Api, mode: str, overrides: dict[str, int]
) -> None:
    owners = owners_of(api)
    job_id = start_job(api, owners, mode, **overrides)
    if mode == "server_hierarchical":
        spec = published_spec(live_server.app.state.step_relay, job_id)
        assert spec.replicas == 2 and len({spec.replica_of(o.client_id) for o in owners}) == 2
    train_concurrently(api, live_server, owners, job_id)
    assert_job_completed(api, job_id)
    assert_same_adapters(owners)
    assert all(len(o.losses) == 4 and all(torch.isfinite(torch.tensor(o.losses))) for o in owners)


def _put(
    api: Api, owner: DataOwner, ref: MessageRef, body: bytes, content_type: str = "application/octet-stream"
):  # type: ignore[no-untyped-def]
    path = STEP_MESSAGE_PATH.format(
        job_id=ref.job_id,
        round_number=ref.round_number,
        step=ref.step,
        direction=ref.direction.value,
        sequence=ref.sequence,
    )
    return api.as_(owner.credential).request(
        "PUT", path, content=body, headers={"Content-Type": content_type}
    )


def _audit_count(settings: Settings) -> int:
    engine = sa.create_engine(settings.resolved_database_url())
    with engine.connect() as conn:
        count = conn.execute(sa.text("select count(*) from audit_events")).scalar_one()
    engine.dispose()
    return int(count)


def test_hostile_step_input_gets_a_clear_4xx_and_stores_nothing(
    live_server: LiveServer, api: Api, settings: Settings
) -> None:
    owners = owners_of(api)
    outsider = enroll_owner(api, "outsider", 5)
    job_id = start_job(api, owners, "sequential")
    owner = owners[0]
    channel = owner.channel(live_server, job_id, server_public_key(api, owner, job_id))
    batch = client_batch(owner.client_id, 0)
    first = run_client_step(owner.trainer, channel, 1, 0, batch)  # honest step: sequences 1 (fwd), 2 (grad)
    assert first.attempts == 1

    runtime: StepRelay = live_server.app.state.step_relay
    store = runtime.store
    assert isinstance(store, InMemoryBlobStore)
    h0 = owner.trainer.forward_front(batch).detach()  # (batch, seq, hidden)
    mask = batch["attention_mask"]
    keys = channel.keys

    def ref(
        step: int,
        sequence: int,
        direction: MessageDirection = MessageDirection.activations,
        job: int = job_id,
    ) -> MessageRef:
        return MessageRef(
            job_id=job,
            round_number=1,
            step=step,
            client_id=owner.client_id,
            direction=direction,
            sequence=sequence,
        )

    fresh = ref(1, 10)
    tampered = bytearray(seal_activations(keys, fresh, h0, mask, torch.float32))
    tampered[-1] ^= 0x01
    replayed = ref(1, 1)  # properly sealed, but sequence 1 of this stream was already accepted
    stolen = seal_activations(
        keys, ref(0, 1), h0, mask, torch.float32
    )  # an envelope moved to another address
    cases: list[tuple[str, MessageRef, bytes, DataOwner, int, str]] = [
        (
            "wrong dtype",
            fresh,
            seal_activations(keys, fresh, h0, mask, torch.float16),
            owner,
            422,
            "wrong_tensor",
        ),
        (
            "wrong shape",
            ref(1, 11, MessageDirection.gradients),
            seal_hidden(keys, ref(1, 11, MessageDirection.gradients), h0[..., :8], torch.float32),
            owner,
            422,
            "wrong_tensor",
        ),
        ("tampered", fresh, bytes(tampered), owner, 400, "tampered_message"),
        ("moved envelope", fresh, stolen, owner, 400, "tampered_message"),
        (
            "replayed sequence",
            replayed,
            seal_activations(keys, replayed, h0, mask, torch.float32),
            owner,
            409,
            "replayed_message",
        ),
        (
            "unknown job",
            ref(1, 12, job=999),
            stolen,
            owner,
            404,
            "job_not_found",
        ),
        (
            "client not in the job",
            fresh,
            seal_activations(keys, fresh, h0, mask, torch.float32),
            outsider,
            404,
            "job_not_found",
        ),
        (
            "result direction",
            ref(1, 13, MessageDirection.activations_result),
            b"x" * 64,
            owner,
            400,
            "wrong_direction",
        ),
        ("empty body", fresh, b"", owner, 400, "bad_request"),
    ]
    keys_before = set(store._blobs)  # the embedded store itself: nothing may appear in it
    audit_before = _audit_count(settings)
    for what, target, body, sender, status, code in cases:
        response = _put(api, sender, target, body)
        assert response.status_code == status, (what, response.status_code, response.text)
        assert response.json()["error"]["code"] == code, (what, response.text)
        assert response.json()["error"]["message"], what
    wrong_type = _put(api, owner, fresh, b"x", content_type="application/json")
    assert wrong_type.status_code == 415, wrong_type.text
    assert set(store._blobs) == keys_before
    assert _audit_count(settings) == audit_before

    # Idempotency: the same forward again is a no-op 200; other bytes at its address are a 409.
    forward = ref(0, 1)
    original = store.get(forward.blob_key())
    assert original is not None
    again = _put(api, owner, forward, original)
    assert again.status_code == 200 and again.json()["outcome"] == "identical", again.text
    conflict = _put(api, owner, forward, original[:-1] + bytes([original[-1] ^ 1]))
    assert conflict.status_code == 409 and conflict.json()["error"]["code"] == "conflicting_duplicate"
    assert store.get(forward.blob_key()) == original

    # A backward whose forward is not in flight: admitted, then refused by the worker → the long-poll says
    # 409 at once (it waits on the task, not only on the blob), and the honest step after it works.
    orphan = ref(1, 20, MessageDirection.gradients)
    assert (
        _put(api, owner, orphan, seal_hidden(keys, orphan, torch.randn_like(h0), torch.float32)).status_code
        == 201
    )
    result_path = STEP_RESULT_PATH.format(
        job_id=job_id, round_number=1, step=1, direction="gradients", sequence=20
    )
    refused = api.as_(owner.credential).get(result_path, params={"wait_s": 30})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "step_graph_missing", (
        refused.text
    )
    with pytest.raises(StepConflict, match="step_graph_missing"):
        channel.client.wait_result(orphan, timeout_s=30)
    with pytest.raises(StepHttpError) as foreign:
        channel.client.wait_result(ref(1, 21), timeout_s=1)  # nothing was uploaded there
    assert foreign.value.status == 404

    channel.next_sequence = itertools.count(100).__next__  # past every sequence the probes used
    second = run_client_step(owner.trainer, channel, 1, 1, client_batch(owner.client_id, 1))
    assert second.attempts == 1 and torch.isfinite(torch.tensor(second.loss))
    channel.client.close()


def upload_a_forward_that_waits(
    live_server: LiveServer, api: Api
) -> tuple[DataOwner, ClientChannel, MessageRef, UploadReceipt]:
    """One owner's first forward of a `client_batch` job whose batch waits (30 s window) for all three
    clients: its result long-polls answer 204 until the window ends."""
    owners = owners_of(api)
    job_id = start_job(api, owners, "client_batch")
    owner = owners[0]
    channel = owner.channel(live_server, job_id, server_public_key(api, owner, job_id))
    batch = client_batch(owner.client_id, 0)
    forward = channel.ref(1, 0, MessageDirection.activations)
    h0 = owner.trainer.forward_front(batch)  # (batch, seq, hidden)
    receipt = channel.client.upload(
        forward, seal_activations(channel.keys, forward, h0, batch["attention_mask"], torch.float32)
    )
    return owner, channel, forward, receipt


def test_long_poll_answers_204_with_retry_after_while_the_batch_waits(
    live_server: LiveServer, api: Api
) -> None:
    owner, channel, forward, receipt = upload_a_forward_that_waits(live_server, api)
    assert receipt.outcome == "stored" and receipt.result_path is not None
    waiting = api.as_(owner.credential).get(receipt.result_path, params={"wait_s": 0.3})
    assert waiting.status_code == 204 and waiting.headers["Retry-After"] == "0"
    with pytest.raises(TimeoutError):
        channel.client.wait_result(forward, timeout_s=0.3)
    channel.client.close()


def test_the_celery_control_plane_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fastapi.testclient import TestClient\n"
        "from backend.app import create_app\n"
        "from backend.settings import Settings\n"
        f"app = create_app(Settings(data_dir=Path({str(tmp_path)!r}), executor='celery',"
        " redis_url='redis://127.0.0.1:6379/12', bootstrap_admin_token='flglm_at_x'))\n"
        "with TestClient(app) as http:\n"
        "    assert http.get('/openapi.json').status_code == 200\n"
        "assert type(app.state.step_relay.dispatcher).__name__ == 'CeleryDispatcher'\n"
        "assert 'torch' not in sys.modules, 'torch was imported by the control plane'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]


def test_waiting_requests_hold_no_database_connection(live_server: LiveServer, api: Api) -> None:
    """A round's worth of agents long-polling at once (more than the pool holds) must leave the pool free:
    the access check runs in a brief session of its own, released before the wait starts. An operator's
    page keeps answering meanwhile, and every long-poll answers its 204."""
    owner, channel, _, receipt = upload_a_forward_that_waits(live_server, api)
    assert receipt.result_path is not None
    pool = live_server.app.state.engine.pool
    waiters = 24  # more than SQLite's QueuePool holds (5 + 10 overflow)
    agent = api.as_(owner.credential)
    with ThreadPoolExecutor(max_workers=waiters) as threads:
        polls = [threads.submit(agent.get, receipt.result_path, params={"wait_s": 4}) for _ in range(waiters)]
        held = []
        for _ in range(5):  # while the long-polls wait (4 s); a sample may catch one brief access check
            time.sleep(0.5)
            held.append(pool.checkedout())
        jobs = api.get("/jobs")
        answers = [poll.result(timeout=60).status_code for poll in polls]
    assert min(held) == 0, f"pooled connections held by waiting long-polls: {held}"
    assert jobs.status_code == 200 and answers == [204] * waiters
    channel.client.close()
