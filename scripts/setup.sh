#!/usr/bin/env bash
# Create or reuse .venv and install flux-app with what it needs. Idempotent and quick when
# nothing changed (a stamp of pyproject.toml's hash skips the pip calls).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.flux-app-installed"
want=$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "[setup] $VENV is up to date"
  exit 0
fi
"$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
# torch/torchvision first, pinned to the releases these machines carry on disk (x86_64,
# Python 3.11); elsewhere pip resolves pyproject's ranges.
if [ "$(uname -m)" = "x86_64" ] && "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  if ! "$VENV/bin/python" -c 'import torch, torchvision; assert torch.__version__.startswith("2.14.1")' 2>/dev/null; then
    echo "[setup] installing torch 2.14.1 / torchvision 0.29.1 (about 1-2 minutes)"
    "$VENV/bin/python" -m pip install -q torch==2.14.1 torchvision==0.29.1 2>&1 | grep -v "^WARNING: Location" || true
  fi
fi
echo "[setup] installing flux-app and its dependencies"
"$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c 'import torch, torchvision, flwr, hdbscan, sklearn, matplotlib, flux_app' \
  || { echo "[setup] import check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, flwr; print("torch", torch.__version__, "flwr", flwr.__version__)')"
