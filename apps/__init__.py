"""The apps above the core: the `flglm` command (CLI, bench, demo) and the composition root."""
