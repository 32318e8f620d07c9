"""Benchmarks behind `flglm bench`: each returns one JSON-able dict of figures measured side by side."""
