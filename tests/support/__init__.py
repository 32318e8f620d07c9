"""Helpers and fixtures that more than one test module uses (tests/conftest.py registers the fixtures)."""
