"""A round's FedAvg survives the blob store losing it (a Redis restart without persistence) after the round
closed: from the average the worker saved, or from the adapters the agents send again.

The embedded backend keeps its blobs in memory; the loss is made by deleting the round's uploads, example
counts and results from that store (and the upload replay guard, which a Redis restart loses too).
"""

from __future__ import annotations

import pytest
import torch

from flglm.agent_step import ClientChannel, download_round_adapters, upload_round_adapters
from flglm.contracts.artifacts import client_adapters_path
from flglm.step_client import StepNotFound
from flglm.step_protocol import client_adapters_ref
from flglm.wire.sequence import ReplayGuard
from tests.support.control_plane import Api, LiveServer
from tests.support.step_agents import DataOwner, close_round, enroll_owner, published_spec, server_public_key
from tests.support.step_agents import start_job as start_step_job


def lose_round(live: LiveServer, owners: list[DataOwner], job_id: int, number: int) -> None:
    """What a Redis restart leaves of round `number`: no upload, example count or FedAvg result."""
    relay = live.app.state.step_relay
    for owner in owners:
        ref = client_adapters_ref(job_id, number, owner.client_id)
        for key in (
            ref.blob_key(),
            ref.result_ref().blob_key(),
            f"examples:{job_id}:{number}:{owner.client_id}",
        ):
            assert relay.store.wait_for(key, 30) is not None, key  # the FedAvg may still be running
            relay.store.delete(key)
    relay.dispatcher.runtime.upload_guard = ReplayGuard()


def setup(live: LiveServer, api: Api) -> tuple[list[DataOwner], list[ClientChannel], int]:
    owners = [enroll_owner(api, f"owner-{i}", 10 * (i + 1)) for i in range(2)]
    job_id = start_step_job(api, owners, "sequential", rounds=2, steps_per_round=1)
    server_b64 = server_public_key(api, owners[0], job_id)
    return owners, [o.channel(live, job_id, server_b64) for o in owners], job_id


@pytest.mark.parametrize("resent", [False, True], ids=["asked", "resent-then-asked"])
def test_results_lost_after_one_owner_took_its_copy_are_published_again_from_the_saved_average(
    live_server: LiveServer, api: Api, resent: bool
) -> None:
    """Owner 0 took round 1's average and moved on (it will never send round 1's adapters again); the loss
    comes before owner 1 asked for its copy. Owner 1 still gets the same average, from the saved one: when it
    just asks, and when it first sent its adapters again (as an agent does when it is told its upload is gone
    while the job's spec is being republished) — the FedAvg must not wait for owner 0's upload."""
    owners, channels, job_id = setup(live_server, api)
    close_round(api, owners, channels, job_id, 1)
    assert api.ok("GET", f"/jobs/{job_id}")["current_round"] == 2
    first = download_round_adapters(owners[0].trainer, channels[0], 1, timeout_s=30)
    lose_round(live_server, owners, job_id, 1)
    if resent:
        upload_round_adapters(owners[1].trainer, channels[1], 1, owners[1].example_count)
    second = download_round_adapters(owners[1].trainer, channels[1], 1, timeout_s=30)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    close_round(api, owners, channels, job_id, 2)  # the job goes on
    for owner, channel in zip(owners, channels, strict=True):
        download_round_adapters(owner.trainer, channel, 2, timeout_s=30)
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    for channel in channels:
        channel.client.close()


def test_uploads_lost_before_the_average_was_saved_are_sent_again_after_the_round_closed(
    live_server: LiveServer, api: Api
) -> None:
    """The loss comes before the FedAvg ran (its saved average is gone too) but after every owner reported
    round 1 done, which opened round 2: asking for the average says `upload_not_found`, and the owners' second
    uploads of round 1's adapters are let in (not `stale_round`), so the average is computed again. The same
    holds for the job's last round once the job completed."""
    owners, channels, job_id = setup(live_server, api)
    checkpoint_dir = published_spec(live_server.app.state.step_relay, job_id).checkpoint_dir
    for number in (1, 2):
        close_round(api, owners, channels, job_id, number)
        lose_round(live_server, owners, job_id, number)
        client_adapters_path(checkpoint_dir, number).unlink()
        try:
            download_round_adapters(owners[0].trainer, channels[0], number, timeout_s=30)
        except StepNotFound as exc:
            assert exc.code == "upload_not_found", exc
        else:
            raise AssertionError("the lost upload was not noticed")
        for owner, channel in zip(owners, channels, strict=True):
            upload_round_adapters(owner.trainer, channel, number, owner.example_count)
        averaged = [
            download_round_adapters(o.trainer, c, number, timeout_s=30)
            for o, c in zip(owners, channels, strict=True)
        ]
        assert all(torch.equal(averaged[0][k], averaged[1][k]) for k in averaged[0])
        assert client_adapters_path(checkpoint_dir, number).is_file()
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "completed"
    for channel in channels:
        channel.client.close()
