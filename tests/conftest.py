"""Test-wide settings: offline hub, the shared fixtures (tests/support), the real services, their markers."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

# Before any of them is imported: the shared helpers' asserts explain their failures like a test's own.
pytest.register_assert_rewrite("tests.support")

# The shared fixtures, available to every test without importing a conftest (only this root conftest may
# name plugins). Helpers without fixtures are imported from tests.support by the modules that use them.
pytest_plugins = [
    "tests.support.control_plane",
    "tests.support.celery_workers",
    "tests.support.flglm_serve",
    "tests.support.dashboard",
]

POSTGRES_URL = os.environ.get("FLGLM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FLGLM_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real PostgreSQL; fails (never skips) when it is unreachable."""
    import sqlalchemy as sa

    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
    except Exception as exc:  # pragma: no cover - only when the service is missing
        pytest.fail(f"PostgreSQL is required at {POSTGRES_URL}: {exc}")
    finally:
        engine.dispose()
    return POSTGRES_URL


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of the real Redis; fails (never skips) when it is unreachable."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - only when the service is missing
        pytest.fail(f"Redis is required at {REDIS_URL}: {exc}")
    finally:
        client.close()
    return REDIS_URL


# A test that needs a service carries its marker because it uses the service's fixture, anywhere in its
# fixture closure: `-m "not redis"` then leaves out exactly what Redis would fail. A fixture that asks for
# one only in some of its params (request.getfixturevalue) marks those params instead, e.g.
# `pytest.param("postgres", marks=pytest.mark.postgres)`; tests/test_markers.py checks both.
SERVICE_MARKERS = {"postgres_url": "postgres", "redis_url": "redis"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        closure = getattr(item, "fixturenames", ())
        for fixture, marker in SERVICE_MARKERS.items():
            if fixture in closure:
                item.add_marker(marker)
