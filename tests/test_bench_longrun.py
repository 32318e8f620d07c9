"""`flglm bench longrun`, small: a real job through serve + worker + agents, and what it leaves behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from apps.bench.longrun import (
    LongRunConfig,
    classify_groups,
    key_group,
    longrun_table,
    retention_rules,
    run_longrun_bench,
)

ROUNDS, STEPS, AGENTS = 2, 10, 2  # 2 rounds x 5 steps per client


@pytest.mark.slow
def test_small_longrun_applies_every_step_once_and_leaks_nothing(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    # redis_url: Redis must be up (the bench uses database 6 of the same server).
    config = LongRunConfig(
        steps=STEPS, rounds=ROUNDS, agents=AGENTS, timeout_s=300, database_url=postgres_url
    )
    messages: list[str] = []
    result = run_longrun_bench(config, tmp_path, messages.append)
    assert any("client steps" in m for m in messages)  # progress lines as the job runs
    done = result["completed"]
    assert done["status"] == "completed", result
    assert done["agent_exit_codes"] == [0] * AGENTS
    assert done["client_steps"] == STEPS * AGENTS and done["steps_per_s"] > 0

    once = result["exactly_once"]
    assert once["ok"], once
    assert once["applied"] == once["applied_unique"] == STEPS * AGENTS
    assert once["missing"] == [] and once["unexpected"] == []
    assert STEPS <= once["server_steps"] <= STEPS * AGENTS
    assert once["journal_entries"] <= once["server_steps"]  # the checkpointed ones expire

    assert result["leaks"] == [], {n: g for n, g in result["redis"]["groups"].items() if n in result["leaks"]}
    groups = result["redis"]["groups"]
    for direction in ("activations", "activations_result", "gradients", "gradients_result"):
        group = groups[f"flglm:blob:msg:{{n}}:{{n}}:{{n}}:{{n}}:{direction}:{{n}}"]
        assert group["count"] == STEPS * AGENTS, (direction, group)
        assert 0 < group["ttl_min_s"] <= group["ttl_max_s"] <= 6 * 3600, (direction, group)
    assert not any(name.startswith("flglm:blob:staging:") for name in groups)  # deleted after admission
    assert all(g["kind"] != "unknown" for g in groups.values()), groups

    rows = result["rows"]
    assert rows["step_metrics"] == {"count": STEPS * AGENTS, "expected": STEPS * AGENTS}
    assert rows["rounds"]["count"] == ROUNDS and rows["round_participants"]["count"] == ROUNDS * AGENTS
    assert result["row_mismatches"] == []
    assert result["audit_actions"]["job.start"] == 1 and result["audit_actions"]["job.complete"] == 1
    rss = result["peak_rss_bytes"]
    assert rss["backend"] > 10 * 2**20 and rss["worker"] > 10 * 2**20
    assert result["ok"] is True
    table = longrun_table(result)
    assert "leaks: none" in table and "peak RSS" in table and "overall: ok" in table


def test_a_key_without_ttl_or_beyond_its_promise_is_a_leak() -> None:
    groups: dict[str, dict[str, Any]] = {
        key_group(key): {"count": 1, "no_ttl": no_ttl, "ttl_min_s": ttl, "ttl_max_s": ttl, "example": key}
        for key, no_ttl, ttl in [
            ("flglm:blob:msg:1:1:0:2:activations:1", 0, 3600),  # within blob_ttl_s
            ("flglm:blob:journal:1:0:7", 1, -1),  # no TTL: a leak
            ("flglm:blob:staging:msg:1:1:0:2:activations:1:" + "ab" * 16, 0, 7200),  # > 600 s: a leak
            ("mystery:42", 1, -1),  # nobody documents it: a leak
            ("_kombu.binding.flglm.replica.0", 1, -1),  # broker bookkeeping: permanent
            ("celery-task-meta-3f2a1c9e-1111-2222-3333-444455556666", 0, 100),
        ]
    }
    leaks = classify_groups(groups, retention_rules())
    assert sorted(leaks) == sorted(
        [
            "flglm:blob:journal:{n}:{n}:{n}",
            "flglm:blob:staging:msg:{n}:{n}:{n}:{n}:activations:{n}:{hex}",
            "mystery:{n}",
        ]
    )
    assert groups["_kombu.binding.flglm.replica.{n}"]["verdict"] == "permanent (documented)"
    assert groups["celery-task-meta-{uuid}"]["verdict"] == "expires as promised"
    assert groups["flglm:blob:msg:{n}:{n}:{n}:{n}:activations:{n}"]["writer"].startswith("backend/steps")
