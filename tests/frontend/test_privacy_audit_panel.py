"""The job page's "Privacy audit" card in Chromium, checked against the API's JSON: every figure it shows is
the API's (formatted here independently), the strongest attack is marked, an admin's "Run audit" starts an
audit and is disabled while it runs, and viewers get no button."""

from __future__ import annotations

import re
import time
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from tests.support.control_plane import ADMIN_TOKEN, job_spec
from tests.support.dashboard import SCREENSHOTS, Dashboard, signed_in_page

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TEXTS = [
    "The river rose overnight and the town council met at dawn to plan the evacuation of the low streets.",
    "A small bakery on the corner sells rye bread, honey cakes and strong coffee to the early commuters.",
    "Researchers measured the glacier's retreat with drones and found it had lost forty metres in a year.",
]
AUDIT_WAIT_S = 240.0
AUDIT_TIMEOUT_MS = 240_000


def fixed(value: float, digits: int) -> str:
    """What the page's formatNumber shows (en-US, `digits` decimals): ECMA-402 rounds the exact value of
    the double, ties away from zero; thousands separated by commas."""
    exact = Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
    return f"{exact:,.{digits}f}"


def expected_cells(attack: dict[str, Any]) -> dict[str, str]:
    low, high = attack["token_recovery_ci"]
    return {
        "token-recovery": f"{fixed(100 * attack['token_recovery'], 1)} %",
        "token-recovery-ci": f"[{fixed(100 * low, 1)}, {fixed(100 * high, 1)}] %",
        "exact-sequences": f"{fixed(100 * attack['exact_sequences'], 1)} %",
        "rouge-l": fixed(attack["rouge_l"], 3),
        "tokens": f"{attack['tokens']:,}",
    }


def wait_until_ended(dashboard: Dashboard, job_id: int, audit_id: int) -> dict[str, Any]:
    deadline = time.monotonic() + AUDIT_WAIT_S
    while True:
        audit: dict[str, Any] = dashboard.api.ok("GET", f"/jobs/{job_id}/privacy-audits/{audit_id}")
        if audit["status"] in ("completed", "failed"):
            return audit
        assert time.monotonic() < deadline, audit
        time.sleep(0.5)


def check_card_against_api(page: Page, audit: dict[str, Any]) -> None:
    block = page.get_by_test_id(f"privacy-audit-{audit['id']}")
    expect(block).to_have_attribute("data-status", "completed", timeout=AUDIT_TIMEOUT_MS)
    result = audit["result"]
    rows = block.locator("tbody tr")
    expect(rows).to_have_count(len(result["attacks"]))
    for attack in result["attacks"]:
        row = block.locator(f'tr[data-attack="{attack["attack"]}"]')
        for testid, text in expected_cells(attack).items():
            expect(row.get_by_test_id(testid)).to_have_text(text)
        strongest = attack["attack"] == result["strongest_attack"]
        expect(row).to_have_attribute("data-strongest", "true" if strongest else "false")
        if strongest:
            expect(row).to_have_class(re.compile(r"\bstrongest\b"))
            expect(row).to_contain_text("strongest")
    share = fixed(100 * result["strongest_token_recovery"], 1)
    expect(block.get_by_test_id("strongest")).to_contain_text(f"{share} % of the tokens")
    epsilon = result["activation_epsilon"]
    assert epsilon is not None
    shown = fixed(epsilon, 0 if epsilon >= 100 else 2)
    expect(block.get_by_test_id("epsilon")).to_have_text(f"ε = {shown} at δ = 1e-5, per h0 vector")


def test_the_card_shows_the_apis_figures_and_an_admin_runs_an_audit_from_it(dashboard: Dashboard) -> None:
    # Strong noise: the attacks recover different shares (not all 100 %), so the figures tell rows apart.
    privacy = {"activation_noise": 5.0, "gradient_noise": 3.0}
    spec = job_spec([], name="audited-tiny", model_ref="tiny:llama", privacy=privacy)
    job_id = dashboard.api.ok("POST", "/jobs", 201, json=spec)["id"]
    body = {
        "sequences": 4,
        "seq_len": 8,
        "texts": TEXTS,
        "attacks": ["known_weights_inversion", "gradient_next_token"],
    }
    first = dashboard.api.ok("POST", f"/jobs/{job_id}/privacy-audits", 202, json=body)
    first = wait_until_ended(dashboard, job_id, first["id"])
    assert first["status"] == "completed", first["error"]

    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    card = page.get_by_role("region", name="Privacy audit")
    expect(card).to_be_visible()
    check_card_against_api(page, first)

    # An admin runs a small audit from the card: the button is off while it runs, on again after.
    run = card.get_by_role("button", name="Run audit")
    expect(run).to_be_enabled()
    card.get_by_label("Sequences").fill("4")
    card.get_by_label("Tokens each").fill("8")
    run.click()
    expect(run).to_be_disabled()
    expect(card.locator("article.audit")).to_have_count(2)
    audits = dashboard.api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"]
    assert len(audits) == 2 and audits[1]["id"] == first["id"]
    second = audits[0]
    assert (second["request"]["sequences"], second["request"]["seq_len"]) == (4, 8)
    assert second["created_by"] == first["created_by"] and second["own_texts"] == 0
    second = wait_until_ended(dashboard, job_id, second["id"])
    assert second["status"] == "completed", second["error"]
    check_card_against_api(page, second)
    expect(run).to_be_enabled()
    check_card_against_api(page, first)  # the older audit is still listed, below
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    card.screenshot(path=str(SCREENSHOTS / "privacy-audit-card.png"))
    context.close()

    # A viewer reads the same figures and has no button.
    context, page = signed_in_page(dashboard, dashboard.viewer_token)
    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    check_card_against_api(page, second)
    expect(page.get_by_role("button", name="Run audit")).to_have_count(0)
    context.close()


def test_a_failed_audit_shows_its_error(dashboard: Dashboard) -> None:
    spec = job_spec([], name="unloadable", model_ref="/nonexistent/no-such-model")
    job_id = dashboard.api.ok("POST", "/jobs", 201, json=spec)["id"]
    context, page = signed_in_page(dashboard, ADMIN_TOKEN)
    page.goto(f"{dashboard.base_url}/#/jobs/{job_id}")
    card = page.get_by_role("region", name="Privacy audit")
    expect(card).to_contain_text("never audited")
    card.get_by_label("Sequences").fill("0")
    card.get_by_role("button", name="Run audit").click()  # refused by the API, in words
    expect(page.get_by_role("alert")).to_contain_text("sequences: Input should be greater than or equal to 1")
    card.get_by_label("Sequences").fill("4")
    card.get_by_role("button", name="Run audit").click()
    expect(card.locator("article.audit")).to_have_count(1)
    [audit] = dashboard.api.ok("GET", f"/jobs/{job_id}/privacy-audits")["items"]
    audit = wait_until_ended(dashboard, job_id, audit["id"])
    assert audit["status"] == "failed"
    error = card.get_by_test_id("audit-error")
    expect(error).to_have_text(f"Failed: {audit['error']}", timeout=AUDIT_TIMEOUT_MS)
    context.close()
