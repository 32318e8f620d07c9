"""The dashboard in Debian's Chromium against a live backend with a real job fed by its clients' metrics."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from backend.exports.service import job_checkpoint_dir
from backend.settings import Settings
from flglm.contracts.artifacts import (
    client_adapters_path,
    read_raw_safetensors,
    replica_dir,
    write_raw_safetensors,
)
from tests.support.control_plane import ADMIN_TOKEN, Agent
from tests.support.dashboard import SCREENSHOTS, TIMEOUT_MS, Dashboard, signed_in_page

pytestmark = pytest.mark.browser

STEPS_PER_ROUND = 6


def post_steps(agents: list[Agent], job_id: int, round_number: int, steps: range) -> None:
    """What each agent reports after a training step: loss, tokens, phase timings and wire bytes."""
    for step in steps:
        for i, agent in enumerate(agents):
            body: dict[str, Any] = {
                "round_number": round_number,
                "step": step,
                "loss": 3.2 / (1 + 0.15 * ((round_number - 1) * STEPS_PER_ROUND + step)) + 0.1 * i,
                "tokens": 512,
                "phase_timings_s": {"front": 0.05, "server": 0.2, "back": 0.06},
                "wire_bytes_up": 2 * 1_179_648,
                "wire_bytes_down": 2 * 1_179_648,
            }
            agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)


def write_round_adapters(settings: Settings, job_id: int, round_number: int) -> None:
    """Adapter files laid out as the worker writes them (one tiny float32 tensor each), without torch."""
    directory = job_checkpoint_dir(settings, job_id)
    tensor = ({"dtype": "F32", "shape": [2]}, b"\x00\x00\x80\x3f" * 2)
    server = replica_dir(directory, 0) / "step-0000000006.safetensors"
    server.parent.mkdir(parents=True, exist_ok=True)
    server.write_bytes(write_raw_safetensors({"adapter/layers.1.q_proj.lora_A": tensor}, {}))
    client = client_adapters_path(directory, round_number)
    client.parent.mkdir(parents=True, exist_ok=True)
    client.write_bytes(write_raw_safetensors({"front.layers.0.q_proj.lora_A": tensor}, {}))


def test_admin_creates_starts_watches_pauses_and_resumes_a_job(dashboard: Dashboard) -> None:
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    expect(page.get_by_test_id("role")).to_have_text("admin")

    page.get_by_role("link", name="New job").click()
    page.get_by_label("Job name").fill("news-sources-e2e")
    page.get_by_label("Rounds").fill("2")
    page.get_by_label("Steps per round").fill(str(STEPS_PER_ROUND))
    page.get_by_label("Minimum clients").fill("2")
    page.get_by_label("Activation noise m").fill("2")
    page.get_by_label("Private input block").check()
    page.get_by_label("Private init scale s").fill("0.05")
    for agent in dashboard.agents:
        page.get_by_role("checkbox", name=re.compile(agent.name)).check()
    # An inconsistent spec: the API's 422 reaches the user in words that name the problem.
    page.get_by_label("Server replicas").fill("2")
    page.get_by_role("button", name="Create job").click()
    expect(page.get_by_role("alert")).to_contain_text("replicas > 1 needs parallel_mode")
    page.get_by_label("Server replicas").fill("1")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "job-form.png"), full_page=True)
    # After a full-page picture of a page taller than the window (the form with its privacy fields is),
    # Chromium's next click at the bottom of the page lost its mouseup: scroll back before clicking.
    page.evaluate("window.scrollTo(0, 0)")
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url(re.compile(r"#/jobs/\d+$"))
    job_id = int(page.url.rsplit("/", 1)[1])
    expect(page.locator("#job-title")).to_have_text("news-sources-e2e")
    expect(page.get_by_role("alert")).to_be_hidden()
    # The privacy card says what the agents apply, with ε for SmolLM2's 576 dimensions (m = 2: 389.4).
    privacy = page.get_by_role("region", name="Privacy and split")
    for said in ("m = 2 with clip c = 1", "ε = 389 per h0 vector (δ = 1e-5)", "private: adapters from each",
                 "s = 0.05, decorrelation λ = 0", "not audited", "lora r=8 α=16"):  # fmt: skip
        expect(privacy).to_contain_text(said)
    assert dashboard.api.ok("GET", f"/jobs/{job_id}")["privacy"]["private_front"] is True

    for agent in dashboard.agents:  # their agents run: online from their first heartbeat
        agent.api.ok("POST", "/agent/heartbeat", json={})
    page.get_by_role("button", name="Open for consent").click()
    expect(page.locator("#job-status")).to_contain_text("waiting for clients")
    for agent in dashboard.agents:
        agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    page.get_by_role("button", name="Start").click()
    expect(page.locator("#job-status")).to_contain_text("running")
    expect(page.get_by_test_id("round-counter")).to_have_text("1 / 2")
    expect(page.get_by_test_id("step-counter")).to_have_text(f"0 / {STEPS_PER_ROUND}")
    expect(page.get_by_test_id("export-state")).to_contain_text("Not available yet")

    # The clients train; the page picks their metrics up without a reload.
    post_steps(dashboard.agents, job_id, 1, range(3))
    expect(page.get_by_test_id("step-counter")).to_have_text(f"3 / {STEPS_PER_ROUND}")
    chart = page.get_by_test_id("loss-chart")
    expect(chart).to_have_attribute("data-points", "3")
    expect(chart.locator("canvas")).to_be_visible()
    post_steps(dashboard.agents, job_id, 1, range(3, STEPS_PER_ROUND))
    expect(page.get_by_test_id("step-counter")).to_have_text(f"{STEPS_PER_ROUND} / {STEPS_PER_ROUND}")
    expect(chart).to_have_attribute("data-points", str(STEPS_PER_ROUND))
    expect(page.get_by_test_id("tokens")).to_have_text(f"{2 * STEPS_PER_ROUND * 512:,}")
    expect(page.get_by_test_id("tokens-per-s")).not_to_have_text("—")

    page.get_by_role("button", name="Pause").click()
    expect(page.locator("#job-status")).to_contain_text("paused")
    expect(page.get_by_role("button", name="Pause")).to_have_count(0)
    page.get_by_role("button", name="Resume").click()
    expect(page.locator("#job-status")).to_contain_text("running")
    assert dashboard.api.ok("GET", f"/jobs/{job_id}")["status"] == "running"

    # Round 1 ends with each client's evaluation; round 2 starts and its steps extend the same curves.
    for i, agent in enumerate(dashboard.agents):
        agent.api.ok(
            "POST",
            f"/agent/jobs/{job_id}/rounds/1/done",
            json={"example_count": 100, "eval_metrics": {"accuracy": 0.61 + 0.04 * i, "loss": 1.9 - 0.1 * i}},
        )
    expect(page.get_by_test_id("round-counter")).to_have_text("2 / 2")
    post_steps(dashboard.agents, job_id, 2, range(4))
    expect(page.get_by_test_id("step-counter")).to_have_text(f"4 / {STEPS_PER_ROUND}")
    expect(chart).to_have_attribute("data-points", str(STEPS_PER_ROUND + 4))
    expect(page.get_by_role("region", name="Evaluation per round")).to_contain_text("accuracy 61.0 %")
    clients = page.get_by_role("region", name="Clients")
    expect(clients).to_contain_text(f"round 2, step 4 / {STEPS_PER_ROUND}")  # steps 0..3 reported: the 4th
    expect(clients.get_by_text("online")).to_have_count(2)

    page.wait_for_timeout(300)  # let the progress bar's transition finish before the picture
    page.screenshot(path=str(SCREENSHOTS / "job-page.png"), full_page=True)

    # Round 1 ended, but no worker checkpointed adapters on this deployment: the page says so in words.
    export_state = page.get_by_test_id("export-state")
    page.get_by_role("button", name="Download adapters").click()
    expect(export_state).to_contain_text("Not available yet")
    expect(export_state).to_contain_text("no server adapter checkpoint yet")
    # The files a worker writes at round end (server checkpoint, plaintext FedAvg of the client adapters).
    write_round_adapters(dashboard.settings, job_id, round_number=1)
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download adapters").click()
    download = download_info.value
    assert download.suggested_filename == f"job-{job_id}-adapters.safetensors"
    bundle = read_raw_safetensors(Path(download.path()))
    assert set(bundle) == {"body/layers.1.q_proj.lora_A", "client/front.layers.0.q_proj.lora_A"}
    expect(export_state).to_contain_text("Downloaded")

    # The audit log shows the pause, filtered to this job.
    page.get_by_role("link", name="Audit log").click()
    page.get_by_label("Object type").select_option("job")
    page.get_by_label("Object id").fill(str(job_id))
    page.get_by_role("button", name="Apply filters").click()
    expect(page.get_by_role("table")).to_contain_text("job.pause")
    expect(page.get_by_role("table")).not_to_contain_text("client.enroll")
    context.close()


def test_admin_revokes_a_client_after_confirming(dashboard: Dashboard) -> None:
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.get_by_role("link", name="Clients").click()
    row = page.get_by_role("row", name=re.compile(dashboard.spare.name))
    page.once("dialog", lambda dialog: dialog.dismiss())
    row.get_by_role("button", name=f"Revoke {dashboard.spare.name}").click()
    expect(row).to_contain_text("active")
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name=f"Revoke {dashboard.spare.name}").click()
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button")).to_have_count(0)
    page.screenshot(path=str(SCREENSHOTS / "clients-page.png"), full_page=True)
    context.close()


def test_viewer_sees_no_admin_controls_and_a_forged_admin_call_is_refused(dashboard: Dashboard) -> None:
    job_id = max(job["id"] for job in dashboard.api.ok("GET", "/jobs")["items"])
    context, page = signed_in_page(dashboard, dashboard.viewer_token)
    expect(page.get_by_test_id("role")).to_have_text("viewer")
    expect(page.get_by_role("link", name="New job")).to_have_count(0)
    expect(page.get_by_role("link", name="Audit log")).to_have_count(0)
    expect(page.get_by_role("table")).to_contain_text("news-sources-e2e")
    page.screenshot(path=str(SCREENSHOTS / "jobs-viewer.png"), full_page=True)

    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    expect(page.get_by_test_id("step-counter")).to_be_visible()
    expect(page.get_by_test_id("loss-chart").locator("canvas")).to_be_visible()
    expect(page.get_by_test_id("admin-controls")).to_have_count(0)
    expect(page.get_by_test_id("export-state")).to_contain_text("admin-only")
    for name in ("Pause", "Resume", "Cancel", "Start", "Open for consent", "Download adapters"):
        expect(page.get_by_role("button", name=name)).to_have_count(0)

    page.goto(f"{dashboard.base_url}/#/clients")
    expect(page.get_by_role("table")).to_contain_text("hospital-a")
    expect(page.get_by_role("button", name=re.compile("Revoke"))).to_have_count(0)
    page.goto(f"{dashboard.base_url}/#/jobs/new")
    expect(page.get_by_role("heading", name="Admins only")).to_be_visible()

    # The viewer's own token, used by hand from the page: the API refuses, whatever the UI shows.
    status = page.evaluate(
        """async (jobId) => (await fetch(`/api/v1/jobs/${jobId}/cancel`, {
            method: "POST", headers: {Authorization: `Bearer ${sessionStorage.getItem("flglm.token")}`},
        })).status""",
        job_id,
    )
    assert status == 403
    assert dashboard.api.ok("GET", f"/jobs/{job_id}")["status"] == "running"
    context.close()


def test_api_errors_are_shown_in_plain_words(dashboard: Dashboard) -> None:
    context = dashboard.browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(dashboard.base_url + "/")
    # Keyboard only: the token field has focus on arrival, Enter submits.
    expect(page.get_by_label("API token")).to_be_focused()
    page.keyboard.type("flglm_at_not-a-real-token")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("token was not accepted")
    expect(page.get_by_role("button", name="Sign in")).to_be_visible()
    assert page.evaluate("sessionStorage.getItem('flglm.token')") is None

    page.get_by_label("API token").fill(ADMIN_TOKEN)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Jobs")).to_be_visible()
    page.goto(f"{dashboard.base_url}/#/jobs/9999")
    expect(page.get_by_role("alert")).to_contain_text("does not exist")
    expect(page.get_by_role("heading", name="Job not found")).to_be_visible()
    context.close()


def test_admin_lists_creates_and_revokes_api_tokens(dashboard: Dashboard) -> None:
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.get_by_role("link", name="API tokens").click()
    tokens = page.get_by_role("table")
    expect(tokens).to_contain_text("bootstrap-admin")
    expect(tokens).to_contain_text("ops-viewer")
    assert ADMIN_TOKEN not in page.content() and dashboard.viewer_token not in page.content()

    page.get_by_label("Token name").fill("ci-bot")
    page.get_by_role("button", name="Create token").click()
    secret = page.get_by_test_id("new-token").inner_text()
    assert secret.startswith("flglm_at_")
    assert dashboard.api.as_(secret).ok("GET", "/auth/me")["role"] == "viewer"
    row = page.get_by_role("row", name=re.compile("ci-bot"))
    page.once("dialog", lambda dialog: dialog.accept())
    row.get_by_role("button", name="Revoke ci-bot").click()
    expect(row).to_contain_text("revoked")
    expect(row.get_by_role("button")).to_have_count(0)
    assert dashboard.api.as_(secret).get("/auth/me").status_code == 401

    # The admin's own token is the only admin one: revoking it is refused, in words.
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Revoke bootstrap-admin").click()
    expect(page.get_by_role("alert")).to_contain_text("last active admin token")
    expect(page.get_by_role("row", name=re.compile("bootstrap-admin"))).to_contain_text("active")
    page.screenshot(path=str(SCREENSHOTS / "tokens-page.png"), full_page=True)
    context.close()

    context, page = signed_in_page(dashboard, dashboard.viewer_token)
    expect(page.get_by_role("link", name="API tokens")).to_have_count(0)
    page.goto(f"{dashboard.base_url}/#/tokens")
    expect(page.get_by_role("heading", name="Admins only")).to_be_visible()
    context.close()
