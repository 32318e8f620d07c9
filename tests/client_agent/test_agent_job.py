"""Three `flglm agent run` processes train a 2-round classification job on the embedded backend over TLS.

One agent is SIGKILLed mid-round and restarted (it resumes from its state directory); a fourth agent is
invited but never approves and must never work on the job. Two agents talk to the backend through a
recording proxy: every byte they send is searched for the training strings, their token ids and the labels.
"""

from __future__ import annotations

import json
import re
import signal
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from flglm.data import load_examples, tokenize_examples
from flglm.models import load_tokenizer
from tests.support.agent_processes import LABELS, MODEL_REF, make_agent, wait_until
from tests.support.capture_proxy import CaptureProxy
from tests.support.control_plane import Api, LiveServer, job_spec

ROUNDS, STEPS = 2, 2


def token_patterns(data: Path) -> list[bytes]:
    """Byte patterns of every example's token ids: int64 LE, int32 LE and decimal lists."""
    tokenizer = load_tokenizer(MODEL_REF)
    dataset = tokenize_examples(load_examples(data, "classification", LABELS), tokenizer, 64)
    patterns: list[bytes] = []
    for example in dataset:
        ids = example.input_ids
        patterns += [struct.pack(f"<{len(ids)}q", *ids), struct.pack(f"<{len(ids)}i", *ids)]
        patterns += [", ".join(map(str, ids)).encode(), ",".join(map(str, ids)).encode()]
    return patterns


@pytest.mark.slow  # four agent processes train for minutes on a busy machine (waits of up to 240 s)
def test_three_agents_train_two_rounds_with_a_crash_and_an_unapproved_peer(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    proxies = [CaptureProxy(live_server.base_url, live_server.tls.ca_cert) for _ in range(2)]
    urls = [proxies[0].url, live_server.base_url, live_server.base_url, proxies[1].url]
    agents = [make_agent(tmp_path, api, live_server, f"owner-{i}", i, urls[i]) for i in range(4)]
    spec = job_spec(
        [a.name for a in agents],
        name="agent-e2e",
        model_ref=MODEL_REF,
        task_type="classification",
        adapter={"r": 4, "alpha": 8},
        hyperparameters={"lr": 5e-3, "batch_size": 3, "labels": LABELS, "max_batch_size": 16,
                         "max_seq_len": 64, "batch_window_s": 20.0},
        parallel_mode="client_batch",
        rounds=ROUNDS,
        steps_per_round=STEPS,
        min_clients=3,
    )  # fmt: skip
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    listed = agents[0].cli("jobs")
    assert listed.returncode == 0 and "agent-e2e" in listed.stdout and "never shared" in listed.stdout
    for agent in agents[:3]:
        decided = agent.cli("approve", str(job_id))
        assert decided.returncode == 0 and "approved" in decided.stdout, decided.stderr

    # Owner 2 died right after a step whose metric may not have reached the server: its outbox goes first.
    agents[2].job_dir(job_id).mkdir(parents=True, mode=0o700)
    unsent = {"round_number": 1, "step": 0, "loss": 123.0, "tokens": 1}
    (agents[2].job_dir(job_id) / "unsent_metric.json").write_text(json.dumps(unsent))

    # Owner 1 discloses its example count (FedAvg weight); the captured owner 0 keeps the default (off).
    processes = [
        agent.start_run("--stop-when-done", *(["--share-example-count"] * (i == 1)))
        for i, agent in enumerate(agents[:3])
    ]
    idle_peer = agents[3].start_run()  # invited, never approved
    try:

        def started() -> bool:
            return api.post(f"/jobs/{job_id}/start").status_code == 200

        wait_until(started, 60, "the job to start (three approved agents online)")

        def mid_round_one() -> bool:
            position = agents[0].position(job_id)
            return position is not None and position["round_number"] == 1 and position["next_step"] == 1

        wait_until(mid_round_one, 120, "agent 0 to finish its first step")
        processes[0].send_signal(signal.SIGKILL)
        processes[0].wait(timeout=10)
        processes[0] = agents[0].start_run("--stop-when-done")
        for process, agent in zip(processes, agents[:3], strict=True):
            assert process.wait(timeout=240) == 0, agent.log.read_text()[-3000:]
    finally:
        for process in [*processes, idle_peer]:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)
    for proxy in proxies:
        proxy.close()

    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["status"] == "completed", job
    assert [r["status"] for r in api.ok("GET", f"/jobs/{job_id}/rounds")] == ["closed"] * ROUNDS
    assert "resumed at round 1 step 1" in agents[0].log.read_text()

    # FedAvg applied: after every round the three agents hold the same client adapters.
    for round_number in range(1, ROUNDS + 1):
        states = [
            load_file(a.job_dir(job_id) / f"global_round_{round_number}.safetensors") for a in agents[:3]
        ]
        assert states[0], "no client adapters"
        for state in states[1:]:
            assert state.keys() == states[0].keys()
            assert all(torch.equal(state[k], states[0][k]) for k in state)
    final = load_file(agents[1].job_dir(job_id) / "adapters.safetensors")
    assert any(torch.count_nonzero(t) for t in final.values())

    # Metrics visible through the API: every agent reported each step of each round.
    metrics = api.ok("GET", "/metrics", params={"job_id": job_id, "limit": 200})["items"]
    seen = {(m["client_id"], m["round_number"], m["step"]) for m in metrics}
    assert len({m["client_id"] for m in metrics}) == 3
    assert len(seen) == 3 * ROUNDS * STEPS  # owner 0's step 0 too, although it was killed right after it
    resent = [
        m for m in metrics if m["loss"] == 123.0
    ]  # owner 2's outbox; its real step 0 report was a repeat
    assert [(m["round_number"], m["step"]) for m in resent] == [(1, 0)]
    assert not (agents[2].job_dir(job_id) / "unsent_metric.json").exists()
    assert all(m["loss"] is not None and m["tokens"] > 0 for m in metrics)

    # Local eval of each round's global model, reported by every agent in its round-done report: the eval
    # loss and the accuracy with its interval and n (one held-out example each: 8 rows, eval_fraction 0.1).
    for round_ in api.ok("GET", f"/jobs/{job_id}/rounds"):
        reported = {p["client_id"]: p["eval_metrics"] for p in round_["participants"]}
        assert len(reported) == 3, round_
        for eval_metrics in reported.values():
            assert eval_metrics["eval_examples"] == 1, (round_["number"], eval_metrics)
            assert eval_metrics["accuracy"] in (0.0, 1.0) and 0 < eval_metrics["eval_loss"] < 50
            assert (
                eval_metrics["accuracy_ci_low"]
                <= eval_metrics["accuracy"]
                <= eval_metrics["accuracy_ci_high"]
            )

    # The unapproved agent never worked on the job: no step or adapter traffic, no job state.
    idle_lines = proxies[1].request_lines()
    assert any("/agent/work" in line for line in idle_lines), idle_lines
    assert not any(f"/agent/jobs/{job_id}/" in line for line in idle_lines), idle_lines
    assert not agents[3].job_dir(job_id).exists()

    # Nothing the agents send or log contains a training string, its token ids or a label.
    sent = proxies[0].captured() + proxies[1].captured()
    assert f"/agent/jobs/{job_id}/rounds/1/steps/".encode() in sent  # the capture did see the job
    logs = b"".join(a.log.read_bytes() for a in agents)
    for agent in (agents[0], agents[3]):
        rows = [json.loads(line) for line in agent.data.read_text().splitlines()]
        for row in rows:
            assert row["text"].encode() not in sent and row["text"].encode() not in logs
        for pattern in token_patterns(agent.data):
            assert pattern not in sent
    disclosed = {int(n) for n in re.findall(rb'example_count"?\s*[:=]\s*([0-9]+)', sent)}
    # Without --share-example-count the real count (7 training rows) is never sent: 0 or an equal weight 1.
    assert disclosed and disclosed <= {0, 1}, disclosed
    for label in LABELS:
        assert label.encode() not in sent and label.encode() not in logs
