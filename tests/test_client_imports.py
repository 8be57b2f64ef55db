"""The ClientApp's import path stays free of server-only libraries (issue #15).

Flower 1.42 starts a fresh ClientApp process for every deployment message, so whatever
``client_app`` imports is paid on every message. Clustering (scipy, scikit-learn, hdbscan) and
plotting (matplotlib) are the server's work.
"""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_ONLY = ("sklearn", "scipy", "hdbscan", "matplotlib")


def test_the_client_app_imports_no_server_only_library():
    code = (
        f"import sys, client_app\nprint(','.join(m for m in {SERVER_ONLY!r} if m in sys.modules))\n"
    )
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    got = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )
    assert got.returncode == 0, got.stderr[-2000:]
    assert got.stdout.strip() == "", f"imported by client_app: {got.stdout.strip()}"


def test_the_server_still_finds_what_the_client_does_not_import():
    # the lazy imports are real imports: the server-side functions work
    import numpy as np

    from flux_app.common.agglomerative import dendrogram
    from flux_app.methods.flux.clustering import ari_nmi

    a = np.array([[0.0, 1.0, 4.0], [1.0, 0.0, 4.0], [4.0, 4.0, 0.0]])
    assert dendrogram(a).shape == (2, 4)
    assert ari_nmi([0, 0, 1], [1, 1, 0]) == (1.0, 1.0)
