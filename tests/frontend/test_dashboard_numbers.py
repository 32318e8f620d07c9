"""Every number the dashboard shows is the API's, in one convention (issue 15, finding 7), checked in Chromium
against the JSON of the same backend:

- steps counted from 1 for people: the header's "step 3 / 3" and each client row's "round 2, step 3 / 3";
- the loss chart's x ticks are whole steps;
- the replica table counts a batched server step once (6 steps of 2 clients: 6, not 12);
- evaluation counts are whole (`eval_examples 6`), accuracy and its 95 % interval in % as "[low, high]";
- a client that does not share its example count reads "not shared", not 0;
- a client enrolled with no agent running is offline until its first heartbeat;
- an ended job shows no live tokens / s;
- the jobs list shows each job's id; /favicon.ico is served; the sign-in hint names where the token is.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Locator, Page, expect

from apps.server import create_server_app
from backend.settings import Settings
from tests.support.control_plane import ADMIN_TOKEN, Agent, Api, enroll, job_spec
from tests.support.dashboard import TIMEOUT_MS, Dashboard, signed_in_page

pytestmark = pytest.mark.browser

ROUNDS, STEPS = 2, 3
EVAL = {
    "eval_loss": 1.2346,
    "eval_examples": 6.0,
    "accuracy": 0.5,
    "accuracy_ci_low": 0.1876,
    "accuracy_ci_high": 0.8124,
}


def start(api: Api, job_id: int) -> None:
    """The operator's start; a job that already started by itself (`start: auto`) is as good."""
    response = api.post(f"/jobs/{job_id}/start")
    assert response.status_code in (200, 409), response.text
    assert api.ok("GET", f"/jobs/{job_id}")["status"] == "running"


def post_step(agents: list[Agent], job_id: int, round_number: int, step: int) -> None:
    for agent in agents:
        body = {"round_number": round_number, "step": step, "loss": 2.0 - 0.1 * step, "tokens": 256,
                "phase_timings_s": {"step": 0.5}}  # fmt: skip
        agent.api.ok("POST", f"/agent/jobs/{job_id}/metrics", 201, json=body)


def heartbeat(agents: list[Agent]) -> None:
    for agent in agents:
        agent.api.ok("POST", "/agent/heartbeat", json={})


def client_row(page: Page, name: str) -> Locator:
    return page.get_by_role("region", name="Clients").get_by_role("row", name=re.compile(name))


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def test_a_jobs_numbers_are_the_apis(dashboard: Dashboard) -> None:
    api, agents = dashboard.api, dashboard.agents
    silent = enroll(api, "never-ran")  # enrolled, its agent never started: no heartbeat
    heartbeat(agents)
    names = [a.name for a in agents] + [silent.name]
    spec = job_spec(names, name="numbers", parallel_mode="client_batch", rounds=ROUNDS, steps_per_round=STEPS,
                    min_clients=len(agents))  # fmt: skip
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    for agent in agents:
        agent.api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    start(api, job_id)

    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    expect(page.locator("#job-title")).to_have_text("numbers")

    # Online: only the clients that heartbeat within the lease; enrolling is no heartbeat.
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    online = {c["client_name"]: c["online"] for c in progress["clients"]}
    assert online == {agents[0].name: True, agents[1].name: True, silent.name: False}, online
    for name, is_online in online.items():
        expect(client_row(page, name)).to_contain_text("online" if is_online else "offline")
        expect(client_row(page, name)).not_to_contain_text("offline" if is_online else "online")

    # Round 1 with its evaluation, then all of round 2's steps: 6 batched server steps of 2 clients.
    for step in range(STEPS):
        post_step(agents, job_id, 1, step)
    for agent in agents:
        agent.api.ok(
            "POST", f"/agent/jobs/{job_id}/rounds/1/done", json={"example_count": 6, "eval_metrics": EVAL}
        )
    for step in range(STEPS):
        post_step(agents, job_id, 2, step)
    chart = page.get_by_test_id("loss-chart")
    expect(chart).to_have_attribute("data-points", str(ROUNDS * STEPS))
    expect(page.get_by_test_id("round-counter")).to_have_text(f"{ROUNDS} / {ROUNDS}")

    # Steps counted from 1, the same in the header and in every client row.
    progress = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    reporting = [c for c in progress["clients"] if c["step"] is not None]
    assert {(c["round_number"], c["step"]) for c in reporting} == {(2, STEPS - 1)}  # the API's are 0-based
    expect(page.get_by_test_id("step-counter")).to_have_text(f"{STEPS} / {STEPS}")
    for c in reporting:
        shown = f"round {c['round_number']}, step {c['step'] + 1} / {progress['steps_per_round']}"
        expect(client_row(page, c["client_name"])).to_contain_text(shown)

    # The chart's x: whole steps 1..6 (the first step of round 1 is step 1).
    expect(chart).to_have_attribute("data-x-ticks", re.compile(r"^\d+( \d+)*$"))
    ticks = [int(t) for t in (chart.get_attribute("data-x-ticks") or "").split()]
    assert ticks and all(1 <= t <= ROUNDS * STEPS for t in ticks), ticks
    assert 1 in ticks and ROUNDS * STEPS in ticks, ticks

    # The replica ran 6 server steps for the 12 reports.
    assert [r["steps_in_window"] for r in progress["replicas"]] == [ROUNDS * STEPS]
    assert progress["steps_reported"] == 2 * ROUNDS * STEPS
    expect(page.get_by_test_id("replica-steps")).to_have_text(str(progress["replicas"][0]["steps_in_window"]))

    # Evaluation: the API's numbers, counts whole, accuracy and its interval in %.
    metrics = api.ok("GET", f"/jobs/{job_id}/rounds")[0]["participants"][0]["eval_metrics"]
    evaluation = page.get_by_test_id("eval-metrics").first
    interval = f"[{pct(metrics['accuracy_ci_low'])}, {pct(metrics['accuracy_ci_high'])}] %"
    expect(evaluation).to_contain_text(f"accuracy {pct(metrics['accuracy'])} % (95 % CI {interval})")
    expect(evaluation).to_contain_text(f"eval_examples {int(metrics['eval_examples'])}")
    expect(evaluation).to_contain_text(f"eval_loss {metrics['eval_loss']:.3f}")
    expect(evaluation).not_to_contain_text("accuracy_ci")
    expect(evaluation).not_to_contain_text("6.000")

    # Running: a live throughput. Ended: none, on the page as in the API.
    expect(page.get_by_test_id("tokens-per-s")).not_to_have_text("—")
    for agent in agents:
        agent.api.ok(
            "POST", f"/agent/jobs/{job_id}/rounds/2/done", json={"example_count": 6, "eval_metrics": EVAL}
        )
    expect(page.locator("#job-status")).to_contain_text("completed")
    ended = api.ok("GET", f"/metrics/jobs/{job_id}/progress")
    assert ended["status"] == "completed" and ended["tokens_per_s"] is None
    expect(page.get_by_test_id("tokens-per-s")).to_have_text("—")
    expect(page.get_by_test_id("tokens")).to_have_text(f"{ended['tokens']:,}")

    # The jobs list: each job's id, linking to its page.
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Jobs").click()
    for job in api.ok("GET", "/jobs")["items"]:
        link = page.get_by_role("link", name=f"Job {job['id']}", exact=True)
        expect(link).to_have_text(f"#{job['id']}")
        expect(link).to_have_attribute("href", f"#/jobs/{job['id']}")
    context.close()


def test_example_counts_not_shared_read_not_shared(dashboard: Dashboard) -> None:
    """`flglm agent enroll` sends no count and an agent without `--share-example-count` heartbeats none:
    the API's 0 is "not shared", never "0" examples."""
    private = enroll(dashboard.api, "keeps-count", example_count=0)
    clients = {c["name"]: c for c in dashboard.api.ok("GET", "/clients", params={"limit": 500})["items"]}
    assert clients[private.name]["example_count"] == 0
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.get_by_role("link", name="Clients").click()
    table = page.get_by_role("table")
    expect(table).to_contain_text(private.name)
    for name, client in clients.items():
        row = table.get_by_role("row", name=re.compile(f"^{re.escape(name)}\\b"))
        count = client["example_count"]
        cell = row.get_by_role("cell").nth(2)
        expect(cell).to_have_text(f"{count:,}" if count else "not shared")
        # Online as the API says: none of these heartbeats except the job's agents (the other test's).
        expect(row.get_by_test_id("client-online")).to_have_text("online" if client["online"] else "offline")
    assert clients[private.name]["online"] is False and clients[private.name]["last_heartbeat_at"] is None
    context.close()


def test_favicon_and_the_sign_in_hint(dashboard: Dashboard, tmp_path: Path) -> None:
    response = httpx.get(f"{dashboard.base_url}/favicon.ico")
    assert response.status_code == 200 and response.headers["content-type"].startswith("image/")
    assert response.content[:4] == b"\x00\x00\x01\x00"  # an ICO

    context = dashboard.browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    page.goto(dashboard.base_url + "/")
    icon = page.locator("link[rel=icon]").get_attribute("href")
    assert icon is not None
    status = page.evaluate("async (href) => (await fetch(href)).status", icon)
    assert status == 200
    # Where the hint says the admin token is: `admin_token` in the server's data directory.
    hint = page.locator("#token-help")
    for said in ("flglm serve", "admin_token", "data directory", "--data-dir", "FLGLM_DATA_DIR",
                 "FLGLM_BOOTSTRAP_ADMIN_TOKEN", "flglm token create NAME"):  # fmt: skip
        expect(hint).to_contain_text(said)
    expect(hint).not_to_contain_text("~/.flglm/admin_token")
    assert not missing, missing
    context.close()

    # ... which is where a first start without a configured token writes it.
    data_dir = tmp_path / "server-data"
    settings = Settings(
        data_dir=data_dir, database_url=f"sqlite:///{tmp_path / 'flglm.db'}", bootstrap_admin_token=""
    )
    app: Any = create_server_app(settings)
    assert app is not None
    written = (data_dir / "admin_token").read_text().strip()
    assert written.startswith("flglm_at_")


def test_what_a_waiting_job_waits_for_and_client_failures_are_the_apis(dashboard: Dashboard) -> None:
    """The job page says what a waiting job waits for, and each client's reported fatal error, as
    `GET /jobs/{id}` does (`waiting_for`, `client_failures`)."""
    api, agents = dashboard.api, dashboard.agents
    heartbeat(agents)
    spec = job_spec(
        [a.name for a in agents], name="waits", min_clients=2, straggler_policy="drop", start="manual"
    )
    job_id = api.ok("POST", "/jobs", 201, json=spec)["id"]
    api.ok("POST", f"/jobs/{job_id}/open")
    agents[0].api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    waiting_for = api.ok("GET", f"/jobs/{job_id}")["waiting_for"]
    assert "a manual start" in waiting_for and "1 of 2 approved, online clients" in waiting_for
    expect(page.get_by_test_id("waiting-for")).to_have_text(f"Waiting for {waiting_for}")

    agents[1].api.ok("POST", f"/agent/invitations/{job_id}/decision", json={"decision": "approve"})
    start(api, job_id)
    expect(page.get_by_test_id("waiting-for")).to_have_text("")
    reason = "ValueError: the model ref cannot be loaded here"
    agents[1].api.ok("POST", f"/agent/jobs/{job_id}/failure", json={"reason": reason})
    failures = api.ok("GET", f"/jobs/{job_id}")["client_failures"]
    assert failures == {agents[1].name: reason}, failures
    expect(page.get_by_test_id("client-failures")).to_have_text(
        f"{agents[1].name} reported a fatal error: {reason}"
    )
    context.close()
