"""What a FAB carries: the apps and their package, not the repository's docs, tests or scripts.

Every ClientApp task of a deployment receives the FAB and unpacks it, so its size is paid per
message (``fab-exclude`` in pyproject.toml).
"""

from __future__ import annotations

import io
import os
import subprocess
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_fab_holds_the_apps_and_their_package_only():
    from flwr.cli.build import build_fab_from_disk

    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(ROOT))) as fab:
        names = set(fab.namelist())
        size = sum(i.file_size for i in fab.infolist())
    tracked = subprocess.run(
        ["git", "ls-files", "flux_app", "examples", "client_app.py", "server_app.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split()
    if not tracked:  # not a git checkout: what is on disk
        tracked = [
            str(p.relative_to(ROOT))
            for p in (ROOT / "flux_app").rglob("*.py")
            if "__pycache__" not in p.parts
        ] + ["client_app.py", "server_app.py"]
    code = {p for p in tracked if p.endswith(".py") and os.path.exists(ROOT / p)}
    assert code <= names, f"the FAB lacks app code: {sorted(code - names)[:5]}"
    assert "pyproject.toml" in names
    for folder in ("docs/", "tests/", "scripts/", "conf/"):
        assert not [n for n in names if n.startswith(folder)], folder
    assert size < 1_500_000  # the package alone (2.5 MB with the benchmark results)
