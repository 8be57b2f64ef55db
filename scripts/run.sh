#!/usr/bin/env bash
# The main job: set up (or reuse) .venv, then run a short FLUX simulation (12 nodes, 2 held out) on the embedded digits
# data through Flower's simulation engine, and print where the results are.
# Extra arguments go to scripts/simulate.py, e.g.  scripts/run.sh -c 'strategy="oracle"'
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/simulate.py --nodes 12 \
  -c 'strategy="flux" dataset="digits" shift="px" level=2 num-server-rounds=6 holdout-clients=2' "$@"
