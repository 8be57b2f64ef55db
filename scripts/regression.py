"""Record (or check) the final results of every strategy on two small fixed settings.

A structural change must not change a number: run ``--record`` before it, ``--check`` after.
The pinned file is ``tests/data/regression.json``; ``tests/test_regression.py`` re-runs the
fast (synthetic) setting in CI and compares.

    python scripts/regression.py --record            # write tests/data/regression.json
    python scripts/regression.py --check             # rerun everything, compare, exit 1 on a diff
    python scripts/regression.py --check --settings synthetic-label-skew
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PINNED = os.path.join(ROOT, "tests", "data", "regression.json")

STRATEGIES = (
    "fedavg",
    "local",
    "oracle",
    "flux",
    "kmeans-flux",
    "feddag",
    "ifca",
    "cfl",
    "pacfl",
    "fesem",
)
#: name -> run-config overrides (every strategy runs each setting)
SETTINGS: dict[str, dict[str, Any]] = {
    # the brief's fixed setting: digits px level 2, 12 nodes (2 held out), 6 rounds, seed 0
    "digits-px-L2": {
        "dataset": "digits",
        "shift": "px",
        "level": 2,
        "num-server-rounds": 6,
        "seed": 0,
        "holdout-clients": 2,
        "num-clusters": 3,
        "cfl-min-round": 3,
    },
    # tiny and fast: what the CI test re-runs
    "synthetic-label-skew": {
        "dataset": "synthetic",
        "shift": "label-skew",
        "rho": 0.5,
        "alpha": 100.0,
        "num-server-rounds": 4,
        "local-epochs": 1,
        "lr": 0.05,
        "seed": 0,
        "holdout-clients": 2,
        "num-clusters": 2,
        "cfl-min-round": 2,
        "feddag-warmup-rounds": 1,
        "feddag-warmup-epochs": 1,
    },
}
NODES = {"digits-px-L2": 12, "synthetic-label-skew": 10}
FINAL_KEYS = (
    "accuracy_known",
    "accuracy_best_over_rounds",
    "accuracy_routed",
    "accuracy_holdout",
    "num_clusters",
    "ari",
    "nmi",
    "routing_accuracy",
    "holdout_assignment",
    "accuracy_by_client",
    "accuracy_holdout_by_client",
)


def run_one(setting: str, strategy: str) -> dict[str, Any]:
    """The numbers of one run that a refactor must not change."""
    try:
        from flux_app.engine.inprocess import run_inprocess
    except ImportError:  # the layout before the per-method packages
        from flux_app.engine.inprocess import run_inprocess

    with tempfile.TemporaryDirectory() as tmp:
        overrides = SETTINGS[setting] | {
            "strategy": strategy,
            "device": "cpu",
            "output-dir": tmp,
            "run-name": "r",
        }
        results, _ = run_inprocess(overrides, NODES[setting])
    final = results["final"]
    clustering = results.get("clustering") or {}
    return {
        "final": {k: final.get(k) for k in FINAL_KEYS},
        "assignment": clustering.get("assignment"),
        "rounds": [
            {k: r.get(k) for k in ("round", "phase", "num_clusters", "accuracy", "train_loss")}
            for r in results["rounds"]
        ],
    }


def run_setting(setting: str, strategies: tuple[str, ...]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    out = {}
    for s in strategies:
        t0 = time.time()
        out[s] = run_one(setting, s)
        print(
            f"[regression] {setting} {s}: accuracy_known={out[s]['final']['accuracy_known']} "
            f"clusters={out[s]['final']['num_clusters']} ari={out[s]['final']['ari']} "
            f"({time.time() - t0:.0f} s)",
            flush=True,
        )
    return out


#: relative tolerance of float comparisons: CPUs with other vector units (AVX2 / AVX-512) round
#: float32 sums differently, ~1e-8 relative on these losses; a changed computation moves them
#: by far more
REL_TOL = 1e-6


def same(a: Any, b: Any, rel: float = REL_TOL) -> bool:
    """``a == b`` with floats equal to ``rel`` (relative); everything else exactly."""
    if isinstance(a, float) or isinstance(b, float):
        if not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
            return False
        return a == b or abs(a - b) <= rel * max(abs(a), abs(b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], rel) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, rel) for x, y in zip(a, b, strict=True))
    return a == b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true")
    mode.add_argument("--check", action="store_true")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument(
        "--pinned",
        default=PINNED,
        help="the results file to record into / check against (results depend on the CPU's "
        "float kernels: pin on the machine that checks)",
    )
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--exact", action="store_true", help="floats to the last bit")
    args = ap.parse_args()
    settings = [s for s in args.settings.split(",") if s]
    strategies = tuple(s for s in args.strategies.split(",") if s)
    pinned: dict[str, Any] = {}
    if os.path.exists(args.pinned):
        with open(args.pinned) as f:
            pinned = json.load(f)
    diffs = 0
    for setting in settings:
        got = run_setting(setting, strategies)
        if args.record:
            pinned.setdefault(setting, {}).update(got)
            continue
        for s in strategies:
            want = pinned.get(setting, {}).get(s)
            if not same(want, json.loads(json.dumps(got[s])), 0.0 if args.exact else REL_TOL):
                diffs += 1
                print(f"[regression] DIFFERENT: {setting} {s}\n  pinned {want}\n  now    {got[s]}")
    if args.record:
        os.makedirs(os.path.dirname(args.pinned), exist_ok=True)
        with open(args.pinned, "w") as f:
            json.dump(pinned, f, indent=1, sort_keys=True)
        print(f"[regression] wrote {args.pinned}")
        return 0
    print(f"[regression] {diffs} difference(s)")
    return 1 if diffs else 0


if __name__ == "__main__":
    sys.exit(main())
