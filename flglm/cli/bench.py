"""`flglm bench`: side-by-side benchmarks that report ratios measured in one run."""

import typer

app = typer.Typer(help="Benchmarks (ratios measured side by side in one run).", no_args_is_help=True)
