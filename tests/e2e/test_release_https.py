"""A job's server replicas leave the embedded worker's memory once the job ends (completed or cancelled),
through a live HTTPS backend; the export and a post-completion eval forward still work (lazy reload)."""

from __future__ import annotations

import torch

from backend.steps.relay import StepRelay
from flglm.adapters import load_trainable_state_dict
from flglm.agent_step import run_client_eval_forward, run_client_step
from flglm.contracts.tasks import REPLICA_COUNTERS
from flglm.export import read_export_bundle
from flglm.step_messages import seal_activations
from flglm.step_protocol import MessageDirection, replica_queue
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import (
    ROUNDS,
    STEPS,
    enroll_owner,
    published_spec,
    server_public_key,
    start_job,
    train_sequentially,
)
from tests.support.step_clients import client_batch
from worker.checkpoints import latest_snapshot, replica_dir
from worker.runtime import WorkerRuntime, load_server_body


def is_loaded(runtime: StepRelay, job_id: int, replica: int) -> bool:
    """Asked on the replica's own queue, so it answers after every task queued before (a release too)."""
    kwargs = {"job_id": job_id, "replica": replica, "load": False}
    answer = runtime.dispatcher.submit(REPLICA_COUNTERS, kwargs, replica_queue(replica)).get(60)
    return answer != {"loaded": False}


def held_replicas(runtime: StepRelay, job_id: int) -> list[int]:
    worker: WorkerRuntime = runtime.dispatcher.runtime  # the embedded executor's worker runtime
    return sorted(replica for job, replica in list(worker.replicas) if job == job_id)


def test_a_completed_job_is_released_and_still_exports_and_evaluates(
    live_server: LiveServer, api: Api
) -> None:
    owners = [enroll_owner(api, f"owner-{i}", 10 * (i + 1)) for i in range(2)]
    job_id = start_job(api, owners, "sequential")
    train_sequentially(api, live_server, owners, job_id)
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    runtime: StepRelay = live_server.app.state.step_relay
    assert not is_loaded(runtime, job_id, 0) and held_replicas(runtime, job_id) == []
    # The last round-end checkpoint ran before the release: had it run after, it would have loaded the
    # replica again to write it.
    spec = published_spec(runtime, job_id)
    snapshot = latest_snapshot(replica_dir(spec.checkpoint_dir, 0))
    assert snapshot is not None and snapshot.server_steps == len(owners) * ROUNDS * STEPS

    exported = api.get(f"/jobs/{job_id}/export")
    assert exported.status_code == 200, exported.text
    body_state = read_export_bundle(exported.content).body_state
    assert body_state.keys() == snapshot.adapters.keys()
    assert all(torch.equal(body_state[k], snapshot.adapters[k]) for k in body_state)

    # The agents' evaluation after the job completed reloads the replica from that checkpoint.
    owner = owners[0]
    channel = owner.channel(live_server, job_id, server_public_key(api, owner, job_id))
    batch = client_batch(owner.client_id, 99)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    remote = run_client_eval_forward(owner.trainer, channel, ROUNDS, 0, ids, mask)  # (batch, seq, vocab)
    channel.client.close()
    assert held_replicas(runtime, job_id) == [0]
    body = load_server_body(spec)
    load_trainable_state_dict(body, snapshot.adapters)
    with torch.no_grad():
        h0 = owner.trainer.front.eval()(ids, mask)  # (batch, seq, hidden)
        local = owner.trainer.back.eval()(body.eval()(h0, mask), mask)  # (batch, seq, vocab)
    assert torch.allclose(remote, local, atol=1e-5)


def test_a_cancelled_job_releases_every_replica_even_with_graphs_in_flight(
    live_server: LiveServer, api: Api
) -> None:
    owners = [enroll_owner(api, f"owner-{i}", 10) for i in range(2)]
    job_id = start_job(api, owners, "server_hierarchical", replicas=2)
    runtime: StepRelay = live_server.app.state.step_relay
    server_b64 = server_public_key(api, owners[0], job_id)
    for owner in owners:  # one forward each: both replicas load and hold a graph waiting for gradients
        channel = owner.channel(live_server, job_id, server_b64)
        batch = client_batch(owner.client_id, 0)
        forward = channel.ref(1, 0, MessageDirection.activations)
        h0 = owner.trainer.forward_front(batch).detach()  # (batch, seq, hidden)
        sealed = seal_activations(channel.keys, forward, h0, batch["attention_mask"], torch.float32)
        channel.client.upload(forward, sealed)
        channel.client.wait_result(forward, timeout_s=60)
        channel.client.close()
    assert held_replicas(runtime, job_id) == [0, 1]
    api.ok("POST", f"/jobs/{job_id}/cancel")
    assert not is_loaded(runtime, job_id, 0) and not is_loaded(runtime, job_id, 1)
    assert held_replicas(runtime, job_id) == []


def test_a_revoked_clients_step_in_flight_stops_holding_the_others_at_once(
    live_server: LiveServer, api: Api
) -> None:
    """Sequential mode: owner 0's forward ran and its graph waits for gradients (the job's in-flight timeout:
    600 s). The operator revokes owner 0; once that is committed the replica hears of the drop
    (`flglm.drop_client`), frees the graph, and owner 1's whole step completes within seconds."""
    owners = [enroll_owner(api, f"owner-{i}", 10) for i in range(2)]
    job_id = start_job(api, owners, "sequential", min_clients=1, straggler_policy="drop")
    server_b64 = server_public_key(api, owners[0], job_id)
    first, second = (owner.channel(live_server, job_id, server_b64) for owner in owners)
    try:
        batch = client_batch(owners[0].client_id, 0)
        h0 = owners[0].trainer.forward_front(batch)  # (batch, seq, hidden)
        forward = first.ref(1, 0, MessageDirection.activations)
        first.client.upload(
            forward, seal_activations(first.keys, forward, h0, batch["attention_mask"], torch.float32)
        )
        first.client.wait_result(forward, 60)  # the graph is in flight; its gradients never come

        api.ok("POST", f"/clients/{owners[0].client_id}/revoke")
        second.result_timeout_s = 20.0  # far below the in-flight timeout the graph would otherwise hold
        result = run_client_step(owners[1].trainer, second, 1, 0, client_batch(owners[1].client_id, 0))
        assert result.attempts == 1 and result.loss > 0
        runtime: StepRelay = live_server.app.state.step_relay
        counters = runtime.dispatcher.submit(
            REPLICA_COUNTERS, {"job_id": job_id, "replica": 0}, replica_queue(0)
        ).get(60)
        assert counters["applied"] == [f"1:0:{owners[1].client_id}"], counters
        rounds = api.ok("GET", f"/jobs/{job_id}/rounds")
        mine = {p["client_id"]: p for p in rounds[0]["participants"]}
        assert mine[owners[0].client_id]["status"] == "dropped", mine
    finally:
        first.client.close()
        second.client.close()
