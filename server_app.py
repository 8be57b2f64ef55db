"""Flower ServerApp: builds the strategy named in the run-config, runs it, writes the outputs."""

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from flux_app.deploy.object_pulls import shorten_first_retry
from flux_app.engine.server import run_server

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run one experiment; results go to ``<output-dir>/<run-name>/``."""
    shorten_first_retry()  # replies pulled before their objects arrive (object_pulls.py)
    _, run_dir = run_server(grid, context.run_config)
    print(f"flux-app: results written to {run_dir}/results.json", flush=True)
