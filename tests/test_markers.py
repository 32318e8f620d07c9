"""The `postgres` and `redis` markers follow what a test uses, as `pytest -m` sees them in a fresh process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json

def pytest_collection_finish(session):
    markers = {item.nodeid: sorted({mark.name for mark in item.iter_markers()}) for item in session.items}
    print("SELECTED " + json.dumps(markers))
"""

# Needs Redis: the `redis_url` argument; Celery workers behind module fixtures; a module's settings_overrides.
REDIS_ARGUMENT = "tests/worker/test_admission.py::test_redis_sequence_guard_is_shared_and_strictly_increasing"
CELERY_WORKERS = (
    "tests/worker/test_celery_worker.py::"
    "test_sigkill_mid_round_then_new_worker_applies_every_step_exactly_once"
)
CELERY_E2E = (
    "tests/e2e/test_steps_celery.py::"
    "test_celery_workers_serve_a_job_over_https_through_a_sigkill_applying_every_step_once"
)
# Parametrised fixtures that ask for the service only in one param (request.getfixturevalue).
REDIS_PARAM = "tests/worker/test_blob_store.py::test_put_is_write_once_and_reports_duplicates[redis]"
MEMORY_PARAM = "tests/worker/test_blob_store.py::test_put_is_write_once_and_reports_duplicates[memory]"
POSTGRES_PARAM = "tests/backend/test_tokens.py::test_create_use_revoke_then_401[postgres]"
SQLITE_PARAM = "tests/backend/test_tokens.py::test_create_use_revoke_then_401[sqlite]"
# Need neither, though their modules' neighbours do.
UNIT = "tests/worker/test_slots.py::test_device_of_a_slot"
UNREACHABLE_REDIS = "tests/worker/test_slots.py::test_auto_worker_without_redis_fails_clearly"
EMBEDDED_E2E = "tests/e2e/test_steps_https.py::test_the_celery_control_plane_never_imports_torch"

NEEDS = {
    REDIS_ARGUMENT: ["redis"],
    CELERY_WORKERS: ["redis", "slow"],
    CELERY_E2E: ["redis", "slow"],
    REDIS_PARAM: ["redis"],
    POSTGRES_PARAM: ["postgres"],
}
NEEDS_NEITHER = [MEMORY_PARAM, SQLITE_PARAM, UNIT, UNREACHABLE_REDIS, EMBEDDED_E2E]


def test_tests_that_need_postgres_or_redis_and_only_those_are_selected_by_their_marker(
    tmp_path: Path,
) -> None:
    (tmp_path / "marker_probe.py").write_text(PROBE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
    }
    modules = sorted({node.split("::")[0] for node in [*NEEDS, *NEEDS_NEITHER]})
    collect = ["--collect-only", "-q", "-p", "no:cacheprovider", "-p", "marker_probe"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *collect, "-m", "postgres or redis", *modules],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("SELECTED ")]
    selected: dict[str, list[str]] = json.loads(line.removeprefix("SELECTED "))
    for node, markers in NEEDS.items():
        assert node in selected, f"{node} is not selected by -m 'postgres or redis'"
        assert selected[node] == markers, (node, selected[node])
    assert not set(NEEDS_NEITHER) & set(selected), set(NEEDS_NEITHER) & set(selected)
