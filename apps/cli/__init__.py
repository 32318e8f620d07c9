"""The `flglm` command line: one Typer app, each verb group in its own module."""
