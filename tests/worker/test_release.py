"""Replicas leave a worker's memory: the release task behind the round-end checkpoint, and the idle TTL
(checkpoint, drop, reload exactly; never while a forward waits or a graph is in flight)."""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

import torch

from flglm.adapters import trainable_state_dict
from flglm.contracts.tasks import RELEASE_JOB, REPLICA_COUNTERS, ROUND_END
from flglm.protocol import ParallelMode
from flglm.step_protocol import replica_queue
from tests.support.engine_harness import Harness
from tests.support.step_clients import CLIENT_IDS, client_batch, reference_sequential_losses
from worker.checkpoints import latest_snapshot, replica_dir
from worker.replica import ServerReplica


def task(h: Harness, name: str, replica: int = 0, **kwargs: Any) -> dict[str, Any]:
    kwargs = {"job_id": h.spec.job_id, "replica": replica, **kwargs}
    return h.executor.submit(name, kwargs, replica_queue(replica)).get(timeout_s=60)


def cpu_adapters(replica: ServerReplica) -> dict[str, torch.Tensor]:
    """The server adapters, copied to the CPU (the replica lives on cuda on a GPU worker)."""
    return {k: v.detach().cpu().clone() for k, v in trainable_state_dict(replica.trainer.body).items()}


def is_loaded(h: Harness, replica: int = 0) -> bool:
    """Asked on the replica's own queue, so every task queued before has run."""
    return task(h, REPLICA_COUNTERS, replica, load=False) != {"loaded": False}


def test_release_runs_after_the_round_end_checkpoint_and_the_job_reloads_from_it(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_every=100)  # only the round end checkpoints
    runtime = h.executor.runtime
    runtime.released_replica_idle_ttl_s = 0.0  # applies only to the replicas of released jobs
    try:
        h.sequential_step(1, 0)
        assert is_loaded(h)
        adapters = cpu_adapters(h.replica())
        # Both queued at once, as the backend does at the job's end: the lane runs them in order.
        round_end = h.executor.submit(
            ROUND_END, {"job_id": h.spec.job_id, "replica": 0, "round_number": 1}, replica_queue(0)
        )
        release = h.executor.submit(RELEASE_JOB, {"job_id": h.spec.job_id, "replica": 0}, replica_queue(0))
        assert round_end.get(timeout_s=60)["server_steps"] == 3
        assert release.get(timeout_s=60) == {"status": "released", "dropped": [0]}
        assert not is_loaded(h) and runtime.replicas == {}
        assert task(h, RELEASE_JOB) == {"status": "released", "dropped": []}  # idempotent
        snapshot = latest_snapshot(replica_dir(h.spec.checkpoint_dir, 0))
        assert snapshot is not None and snapshot.server_steps == 3
        # A later task of the job (an eval forward, say) loads the replica again, from that checkpoint...
        reloaded = cpu_adapters(h.replica())
        assert all(torch.equal(adapters[k], reloaded[k]) for k in adapters)
        # ...and it leaves again after the released jobs' short idle TTL, not the full one.
        assert runtime.replica_idle_ttl_s == 3600.0 and is_loaded(h)
        assert not is_loaded(h) and runtime.replicas == {}
    finally:
        h.executor.close()


def test_an_idle_replica_is_checkpointed_dropped_freed_and_reloads_exactly(tmp_path: Path) -> None:
    h = Harness(tmp_path, checkpoint_every=100)
    runtime = h.executor.runtime
    try:
        assert runtime.replica_idle_ttl_s == 3600.0  # FLGLM_REPLICA_IDLE_TTL_S's default
        losses = h.sequential_step(1, 0)  # 3 server steps, no checkpoint yet
        replica = h.replica()
        adapters = cpu_adapters(replica)
        applied = set(replica.applied)
        assert latest_snapshot(replica_dir(h.spec.checkpoint_dir, 0)) is None
        freed = weakref.ref(replica)
        del replica
        assert is_loaded(h)  # used moments ago: not idle

        runtime.replica_idle_ttl_s = 0.0  # everything unused is now past its TTL
        assert is_loaded(h)  # the task that asks does not load or use it; eviction runs after it
        assert runtime.replicas == {} and not is_loaded(h)
        assert freed() is None, "the evicted replica is still referenced"
        snapshot = latest_snapshot(replica_dir(h.spec.checkpoint_dir, 0))
        assert snapshot is not None and snapshot.server_steps == 3 and set(snapshot.applied) == applied
        assert all(torch.equal(adapters[k], snapshot.adapters[k]) for k in adapters)

        runtime.replica_idle_ttl_s = 3600.0
        reloaded = h.replica()
        assert reloaded.server_steps == 3 and reloaded.applied == applied
        state = cpu_adapters(reloaded)
        assert all(torch.equal(adapters[k], state[k]) for k in adapters)
        # Training goes on as if nothing happened: optimizer moments and counters came back too.
        losses += h.sequential_step(1, 1)
        reference = reference_sequential_losses(h.spec, CLIENT_IDS, steps=2)
        assert max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-4
    finally:
        h.executor.close()


def test_a_replica_with_a_waiting_forward_or_a_graph_in_flight_is_never_evicted(tmp_path: Path) -> None:
    h = Harness(tmp_path, parallel_mode=ParallelMode.client_batch, checkpoint_every=100)
    runtime = h.executor.runtime
    spec, store, public = h.spec, h.store, h.server_public
    try:
        batches = {cid: client_batch(cid, 0) for cid in CLIENT_IDS}
        forwards = {
            cid: c.upload_forward(store, spec, public, 1, 0, batches[cid]) for cid, c in h.clients.items()
        }
        assert h.send(forwards[11])["status"] == "pending"  # waits (30 s window) for the other two
        runtime.replica_idle_ttl_s = 0.0
        assert is_loaded(h) and runtime.evict_idle_replicas() == [] and is_loaded(h)
        for cid in (12, 13):
            h.send(forwards[cid])
        assert h.replica().trainer.pending_steps  # the batch's graph waits for its gradients
        assert runtime.evict_idle_replicas() == [] and is_loaded(h)
        uploads = {
            cid: c.upload_gradients(store, spec, public, forwards[cid], batches[cid])
            for cid, c in h.clients.items()
        }
        statuses = [h.send(uploads[cid][1])["status"] for cid in CLIENT_IDS]
        assert statuses == ["pending", "pending", "done"]
        assert runtime.replicas == {}  # the step is applied: the last task's eviction took the replica
        snapshot = latest_snapshot(replica_dir(spec.checkpoint_dir, 0))
        assert snapshot is not None and snapshot.server_steps == 1
    finally:
        h.executor.close()


def test_a_loading_body_holds_only_its_own_replica_not_the_whole_worker(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """A 70B body loads for minutes: meanwhile the worker's other replicas, evictions and releases go on."""
    import threading

    import worker.runtime

    h = Harness(tmp_path)
    runtime = h.executor.runtime
    real_load = worker.runtime.load_server_body
    started, may_finish = threading.Event(), threading.Event()

    def slow_load(spec: Any) -> Any:
        started.set()
        assert may_finish.wait(timeout=60)
        return real_load(spec)

    monkeypatch.setattr(worker.runtime, "load_server_body", slow_load)
    loader = threading.Thread(target=runtime.replica, args=(h.spec.job_id, 0))
    loader.start()
    try:
        assert started.wait(timeout=60)
        other = threading.Thread(
            target=lambda: (runtime.held(h.spec.job_id, 1), runtime.evict_idle_replicas())
        )
        other.start()
        other.join(timeout=10)
        assert not other.is_alive(), "the runtime-wide lock was held while a body loaded"
        assert runtime.forget(h.spec.job_id + 1) == []  # another job's release is not kept waiting either
    finally:
        may_finish.set()
        loader.join(timeout=120)
    assert runtime.held(h.spec.job_id, 0) is not None  # the load finished and was kept
    h.executor.close()
