"""A job's settings are typed (`flglm.contracts.job_settings`): unknown ones are refused, every default is
stored with the job, and the workers' spec reads the same values the agents read."""

from __future__ import annotations

from fastapi import FastAPI

from backend.steps.service import read_spec
from flglm.contracts.job_settings import AdapterSpec, Hyperparameters
from flglm.protocol import AGENT_JOB_PATH
from tests.support.control_plane import Api, enroll, job_spec, running_job


def test_an_unknown_or_out_of_range_setting_is_refused_naming_it(api: Api) -> None:
    for bad, field in (
        ({"hyperparameters": {"learning_rate": 0.1}}, "hyperparameters.learning_rate"),
        ({"hyperparameters": {"batch_size": 0}}, "hyperparameters.batch_size"),
        ({"hyperparameters": {"lr": 1e300}}, "hyperparameters.lr"),
        ({"adapter": {"kind": "lora", "rank": 8}}, "adapter.rank"),
        ({"adapter": {"method": "prefix"}}, "adapter.method"),
    ):
        response = api.post("/jobs", json=job_spec([], **bad))
        assert response.status_code == 422, bad
        assert field in response.json()["error"]["message"], response.json()
    assert api.ok("GET", "/jobs")["total"] == 0


def test_every_default_is_stored_and_the_workers_read_what_the_agents_read(api: Api, app: FastAPI) -> None:
    agent = enroll(api, "settings-agent")
    job_id = running_job(
        api, [agent], adapter={"kind": "lora", "r": 4}, hyperparameters={"lr": 3e-4, "checkpoint_every": 7}
    )
    job = api.ok("GET", f"/jobs/{job_id}")
    assert job["adapter"] == AdapterSpec(r=4).model_dump(mode="json")  # `kind` read as `method`
    assert job["adapter"]["method"] == "lora" and job["adapter"]["alpha"] == 16
    stored = Hyperparameters.model_validate(job["hyperparameters"])
    assert stored == Hyperparameters(lr=3e-4, checkpoint_every=7)  # every default written with the job
    assert set(job["hyperparameters"]) == set(Hyperparameters.model_fields)

    agent_view = agent.api.ok("GET", AGENT_JOB_PATH.format(job_id=job_id))
    assert Hyperparameters.model_validate(agent_view["hyperparameters"]) == stored
    spec = read_spec(app.state.step_relay, job_id)
    assert spec.hyperparameters == stored and spec.adapter == AdapterSpec(r=4)
    assert spec.checkpoint_every == 7 and spec.seed == stored.seed
    assert spec.max_batch_size == stored.max_batch_size and spec.blob_ttl_s == stored.blob_ttl_s
    # Agents truncate to max_seq_len; the workers also take what a generation round's evaluation appends.
    assert spec.max_seq_len == stored.max_seq_len + stored.eval_max_new_tokens
    assert spec.hyperparameters.train_config().lr == 3e-4
