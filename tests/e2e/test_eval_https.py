"""Eval forwards through the live HTTPS backend (the embedded executor), after the round they evaluate closed.

Which rounds they may name, per-round eval metrics in the repeated round-done report, and ROUGE-L / eval loss
through the server equal to the same model in this process.
"""

from __future__ import annotations

import pytest
import torch

from client_agent.api import ControlPlaneClient
from flglm.adapters import load_trainable_state_dict, trainable_state_dict
from flglm.agent_step import (
    ClientChannel,
    download_round_adapters,
    remote_score_fn,
    run_client_eval_forward,
)
from flglm.data import generation_example
from flglm.models import load_tokenizer
from flglm.protocol import RoundDoneRequest
from flglm.round_eval import round_eval_metrics
from flglm.step_client import StepConflict, StepNotFound
from flglm.step_messages import seal_activations
from flglm.step_protocol import MessageDirection
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import (
    DataOwner,
    close_round,
    enroll_owner,
    published_spec,
    server_public_key,
    start_job,
)
from tests.support.step_clients import MODEL_REF, client_batch
from worker.runtime import load_server_body

ROUNDS = 3


def train_round(
    api: Api, owners: list[DataOwner], channels: list[ClientChannel], job_id: int, number: int
) -> None:
    """One step per owner, adapters up, round done (closes the round), FedAvg down."""
    close_round(api, owners, channels, job_id, number)
    for owner, channel in zip(owners, channels, strict=True):
        download_round_adapters(owner.trainer, channel, number, timeout_s=60)


def test_eval_round_trips_after_the_round_closed(live_server: LiveServer, api: Api) -> None:
    owners = [enroll_owner(api, f"owner-{i}", 10 * (i + 1)) for i in range(2)]
    outsider = enroll_owner(api, "outsider", 1)
    job_id = start_job(api, owners, "sequential", rounds=ROUNDS, steps_per_round=1)
    server_b64 = server_public_key(api, owners[0], job_id)
    channels = [o.channel(live_server, job_id, server_b64) for o in owners]
    owner, channel = owners[0], channels[0]
    batch = client_batch(owner.client_id, 99)

    def eval_forward(number: int, index: int) -> torch.Tensor:
        return run_client_eval_forward(
            owner.trainer, channel, number, index, batch["input_ids"], batch["attention_mask"]
        )

    train_round(api, owners, channels, job_id, 1)
    assert api.ok("GET", f"/jobs/{job_id}")["current_round"] == 2
    closed, current = eval_forward(1, 0), eval_forward(2, 0)  # round 1 closed, round 2 open: both allowed
    assert closed.shape == (*batch["input_ids"].shape, 384) and torch.equal(closed, current)
    # The eval metrics of round 1, reported after it closed, join its round-done report; the agent's client
    # sends only the metrics its consent text lists.
    reported = {"eval_loss": 2.5, "accuracy": 0.5, "undisclosed_figure": 7.0}
    with ControlPlaneClient(live_server.base_url, owner.credential, live_server.tls.ca_cert) as agent:
        agent.round_done(job_id, 1, RoundDoneRequest(example_count=0, eval_metrics=reported))
    round_one = api.ok("GET", f"/jobs/{job_id}/rounds")[0]
    mine = next(p for p in round_one["participants"] if p["client_id"] == owner.client_id)
    assert mine["eval_metrics"] == {"eval_loss": 2.5, "accuracy": 0.5} and mine["example_count"] == 10

    train_round(api, owners, channels, job_id, 2)
    with pytest.raises(StepConflict, match=r"stale_round.*current round or the round before"):
        eval_forward(1, 1)  # two rounds back: refused before anything is stored
    train_round(api, owners, channels, job_id, 3)
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    after_job = eval_forward(3, 0)  # the job just completed: its last round still evaluates
    assert torch.isfinite(after_job).all()
    # A training forward is not let in after the job completed, nor an eval forward of a stranger.
    training = channel.ref(3, 1, MessageDirection.activations)
    h0 = owner.trainer.forward_front(batch).detach()  # (batch, seq, hidden)
    sealed = seal_activations(channel.keys, training, h0, batch["attention_mask"], torch.float32)
    with pytest.raises(StepConflict, match="job_not_running"):
        channel.client.upload(training, sealed)
    stranger = outsider.channel(live_server, job_id, server_b64)
    with pytest.raises(StepNotFound, match="job_not_found"):
        run_client_eval_forward(outsider.trainer, stranger, 3, 0, batch["input_ids"], batch["attention_mask"])

    # Generation metrics through the server equal those of the same model in this process.
    spec = published_spec(live_server.app.state.step_relay, job_id)
    server = live_server.app.state.step_relay.dispatcher.runtime.replica(job_id, 0)
    body = load_server_body(spec)
    load_trainable_state_dict(body, trainable_state_dict(server.trainer.body))
    body.eval()

    def local_score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            h0 = owner.trainer.front.eval()(input_ids, attention_mask)  # (batch, seq, hidden)
            return owner.trainer.back.eval()(body(h0, attention_mask), attention_mask)  # (batch, seq, vocab)

    tokenizer = load_tokenizer(MODEL_REF)
    examples = [
        generation_example("the walrus sat on the", " cobalt fjord"),
        generation_example("hi", " you"),
    ]
    remote_score = remote_score_fn(owner.trainer, channel, 3, first_index=10)  # after the eval batches above
    remote, local = (
        round_eval_metrics(
            score, examples, tokenizer, task="generation", max_length=32, batch_size=2, pad_token_id=0,
            max_new_tokens=3,
        )
        for score in (remote_score, local_score)
    )  # fmt: skip
    assert remote.keys() == {"eval_loss", "eval_examples", "rouge_l"} and remote["eval_examples"] == 2
    assert abs(remote["eval_loss"] - local["eval_loss"]) <= 1e-5 and remote["rouge_l"] == local["rouge_l"]
    for open_channel in (*channels, stranger):
        open_channel.client.close()
