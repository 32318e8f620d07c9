"""Alembic migrations of the job store (`flglm db upgrade`, `backend.migrate.upgrade_to_head`)."""
