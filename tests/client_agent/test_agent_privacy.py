"""`flglm agent` processes and privacy settings: what the consent text says, refusing settings the agent does
not apply, and a private input block whose adapters and seed never leave the data owner's machine."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch
from safetensors.torch import load_file

from backend.exports.service import job_checkpoint_dir
from backend.models import Job
from backend.settings import Settings
from client_agent.api import AgentFailure
from client_agent.privacy import consent_lines, job_privacy
from client_agent.state import record_decision
from flglm import protocol
from flglm.step_messages import open_adapters
from flglm.step_protocol import client_adapters_ref
from flglm.wire.keys import derive_channel_keys, load_private_key, public_key_from_b64
from tests.support.agent_processes import LABELS, MODEL_REF, make_agent, wait_until
from tests.support.capture_proxy import CaptureProxy
from tests.support.control_plane import Api, LiveServer, job_spec
from tests.support.step_agents import published_spec

PRIVATE = {
    "private_front": True,
    "private_init_scale": 0.05,
    "decorrelation": 0.5,
    "activation_noise": 0.5,
    "gradient_noise": 0.5,
}


def tiny_job(names: list[str], **overrides: object) -> dict[str, object]:
    return job_spec(
        names,
        name="privacy-e2e",
        model_ref=MODEL_REF,
        task_type="classification",
        adapter={"r": 4, "alpha": 8},
        hyperparameters={"lr": 5e-3, "batch_size": 3, "labels": LABELS, "max_batch_size": 16,
                         "max_seq_len": 64, "batch_window_s": 20.0},
        parallel_mode="client_batch",
        rounds=1,
        steps_per_round=2,
        **overrides,
    )  # fmt: skip


def invitation(privacy: dict[str, object], **extra: object) -> protocol.InvitationView:
    return protocol.InvitationView.model_validate(
        {"job_id": 7, "name": "j", "model_ref": MODEL_REF, "task_type": "classification",
         "parallel_mode": "client_batch", "rounds": 1, "steps_per_round": 1, "hyperparameters": {},
         "privacy": privacy, "split_plan": {"front_layers": 2}, "job_status": "running", "consent": "invited",
         **extra}
    )  # fmt: skip


def test_consent_text_states_every_setting_and_the_audited_figure() -> None:
    shared = "\n".join(consent_lines(invitation({"wire_dtype": "bfloat16"}), hidden_size=32))
    for said in ("input block (2 block(s))", "(bfloat16)", "activation noise: off", "gradient noise: off",
                 "input block: shared", "your input- and output-block adapters", "not audited"):  # fmt: skip
        assert said in shared, (said, shared)
    audited = invitation(
        {"activation_noise": 4.0, "activation_clip": 2.0},
        audited_token_recovery=0.125,
        audited_attack="learned_inverter",
    )
    text = "\n".join(consent_lines(audited, hidden_size=32))
    assert (
        "m = 4, clip c = 2" in text and "ε = 15.5 per hidden-state vector (δ = 1e-5, hidden size 32)" in text
    )
    assert "12.5 % of training tokens recovered by the strongest audited attack (learned_inverter)" in text
    assert "ε unknown" in "\n".join(consent_lines(audited, hidden_size=None))
    # Jobs stored before the real settings carry the old key at its default (no noise promised): accepted.
    assert job_privacy(7, {"wire_dtype": "float32", "activation_noise_std": 0.0}) == protocol.PrivacySpec()
    for refused in ({"activation_noise_std": 0.1}, {"future_defence": 1}, {"activation_noise": -1}):
        try:
            job_privacy(7, refused)
        except AgentFailure as exc:
            assert (
                exc.exit_code == 2
                and str(exc).startswith("job 7: refused")
                and "nothing was sent" in str(exc)
            )
        else:
            raise AssertionError(f"{refused} was accepted")


def test_settings_the_agent_does_not_apply_are_refused(
    tmp_path: Path, live_server: LiveServer, api: Api
) -> None:
    # The old key was shown to owners and never applied: the API refuses it by name.
    old = api.post("/jobs", json=tiny_job([], privacy={"activation_noise_std": 0.1}))
    assert old.status_code == 422 and "activation_noise_std was never applied" in old.text, old.text
    unknown = api.post("/jobs", json=tiny_job([], privacy={"secret_sauce": 1}))
    assert unknown.status_code == 422 and "secret_sauce" in unknown.text, unknown.text

    agent = make_agent(tmp_path, api, live_server, "owner-0", 0, live_server.base_url)
    job_id = api.ok("POST", "/jobs", 201, json=tiny_job([agent.name]))["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    # A newer server's job with a setting this agent does not know (written past the API, as it would be).
    with live_server.app.state.session_factory() as session, session.begin():
        session.execute(
            sa.update(Job)
            .where(Job.id == job_id)
            .values(privacy={"wire_dtype": "float32", "future_defence": 2})
        )
    listed = agent.cli("jobs")
    assert (
        listed.returncode == 0
        and f"job {job_id}: refused" in listed.stdout
        and "future_defence" in listed.stdout
    )
    approved = agent.cli("approve", str(job_id))
    assert approved.returncode == 2 and "refused" in approved.stderr and "future_defence" in approved.stderr

    # An approval from before the setting appeared: `run` refuses the job before building or sending anything.
    credential = json.loads((agent.state_dir / "credential.json").read_text())["credential"]
    api.as_(credential).ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    record_decision(agent.state_dir, job_id, approved=True)
    api.ok("POST", f"/jobs/{job_id}/start")
    process = agent.start_run("--stop-when-done")
    assert process.wait(timeout=120) == 2
    log = agent.log.read_text()
    assert f"job {job_id}: refused" in log and "future_defence" in log and "nothing was sent" in log
    assert not agent.job_dir(job_id).exists()
    assert api.ok("GET", "/metrics", params={"job_id": job_id})["items"] == []


def seed_patterns(seed: int) -> list[bytes]:
    return [str(seed).encode(), f"{seed:x}".encode(), struct.pack("<q", seed), struct.pack(">q", seed)]


@pytest.mark.slow  # two agent processes train a job, one restarted (waits of up to 240 s)
def test_private_input_block_stays_with_each_agent(
    tmp_path: Path, live_server: LiveServer, api: Api, settings: Settings
) -> None:
    proxies = [CaptureProxy(live_server.base_url, live_server.tls.ca_cert) for _ in range(2)]
    agents = [make_agent(tmp_path, api, live_server, f"owner-{i}", i, proxies[i].url) for i in range(2)]
    job_id = api.ok("POST", "/jobs", 201, json=tiny_job([a.name for a in agents], privacy=PRIVATE))["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    listed = agents[0].cli("jobs").stdout
    for said in ("input block: private", "m = 0.5, clip c = 1", "ε = ", "hidden size 32", "gradient noise: "
                 "Gaussian noise of 0.5", "decorrelation λ = 0.5", "audited token recovery: not audited",
                 "your output-block adapters once per round"):  # fmt: skip
        assert said in listed, (said, listed)
    for agent in agents:
        assert agent.cli("approve", str(job_id)).returncode == 0

    processes = [agent.start_run("--stop-when-done") for agent in agents]
    try:
        wait_until(lambda: api.post(f"/jobs/{job_id}/start").status_code == 200, 60, "the job to start")

        def after_first_step() -> bool:
            position = agents[0].position(job_id)
            return position is not None and position["next_step"] == 1

        wait_until(after_first_step, 120, "agent 0 to finish its first step")
        seed_before = (agents[0].job_dir(job_id) / "private_seed").read_text()
        processes[0].send_signal(signal.SIGKILL)  # a restart must rebuild the same private block
        processes[0].wait(timeout=10)
        processes[0] = agents[0].start_run("--stop-when-done")
        for process, agent in zip(processes, agents, strict=True):
            assert process.wait(timeout=240) == 0, agent.log.read_text()[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=10)
    for proxy in proxies:
        proxy.close()
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    assert "resumed at round 1 step 1" in agents[0].log.read_text()
    assert (agents[0].job_dir(job_id) / "private_seed").read_text() == seed_before
    assert all("defences: h0 clipped" in agent.log.read_text() for agent in agents)
    losses = [m["loss"] for m in api.ok("GET", "/metrics", params={"job_id": job_id})["items"]]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # Each owner's checkpoint keeps its own input block; only the output block was averaged.
    finals = [load_file(agent.job_dir(job_id) / "adapters.safetensors") for agent in agents]
    fronts = [{k: t for k, t in final.items() if k.startswith("front.")} for final in finals]
    assert fronts[0] and all(not torch.equal(fronts[0][k], fronts[1][k]) for k in fronts[0])
    averaged = [load_file(agent.job_dir(job_id) / "global_round_1.safetensors") for agent in agents]
    assert averaged[0] and all(k.startswith("back.") for k in averaged[0])
    assert all(torch.equal(averaged[0][k], averaged[1][k]) for k in averaged[0])
    [fedavg_file] = (Path(job_checkpoint_dir(settings, job_id)) / "client-adapters").glob("*.safetensors")
    assert all(k.startswith("back.") for k in load_file(fedavg_file))

    # What the server got, opened with its key: no input-block adapter; on the wire: no seed, no front bytes.
    spec = published_spec(live_server.app.state.step_relay, job_id)
    assert spec.server_key_file is not None
    sent = b"".join(proxy.captured() for proxy in proxies)
    assert f"/agent/jobs/{job_id}/rounds/1/client-adapters".encode() in sent  # the capture saw the uploads
    for agent, front in zip(agents, fronts, strict=True):
        client_id = json.loads((agent.state_dir / "credential.json").read_text())["client_id"]
        ref = client_adapters_ref(job_id, 1, client_id)
        blob = live_server.app.state.step_relay.store.get(ref.blob_key())
        keys = derive_channel_keys(
            load_private_key(Path(spec.server_key_file)),
            public_key_from_b64(spec.public_key_of(client_id)),
            str(job_id),
            str(client_id),
        )
        uploaded = open_adapters(keys, ref, blob)
        assert uploaded and all(k.startswith("back.") for k in uploaded)
        seed = int((agent.job_dir(job_id) / "private_seed").read_text())
        assert all(pattern not in sent for pattern in seed_patterns(seed))
        assert all(t.numpy().tobytes() not in sent for t in front.values())
