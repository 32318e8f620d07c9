"""Alembic revision files (dated names: YYYY_MM_DD_<rev>_<slug>.py)."""
