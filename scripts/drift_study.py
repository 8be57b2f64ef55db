#!/usr/bin/env python
"""Drift on the FLUX protocol: FLUX re-clustering vs FLUX blind to drift vs a drift-aware Oracle.

Setting: the FLUX FMNIST protocol (``scripts/benchmark.py flux-fmnist``: 10 training + 2
held-out clients, 2 local epochs, SGD 0.005 / 0.9, LeNet-5), ``--rounds`` rounds (default 12),
FLUX clustering at round ``--cluster-round`` (default 3, before the drift), and from round
``--drift-round`` (default 6) a ``--drift-fraction`` (default 0.3: 3 of 10) of the training clients
draw their data from another training group's distribution (``flux_app/data/drift.py``). Nobody
tells FLUX the drift round: with ``flux-drift-check-every=1`` it re-describes the nodes every
round after clustering and re-clusters when one changed. Compared, on the same partitions:

* ``flux``        FLUX with the drift check (``flux-drift-check-every=1``);
* ``flux-blind``  FLUX without it (the clustering of round ``--cluster-round`` stays);
* ``oracle``      the true groups, told the switch at the drift round.

Every round evaluates every training client on its current test data with the model of the
cluster it is assigned to. Each finished run appends one JSON line to ``--output`` (a rerun
skips what is there); ``--report`` prints the table for docs/BENCHMARKS.md.

    python scripts/drift_study.py --shifts px,py --seeds 0,1 --workers 2
    python scripts/drift_study.py --report
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "benchmarks", "drift-study.jsonl")
METHODS = {
    "flux": {"strategy": "flux", "flux-drift-check-every": 1},
    "flux-blind": {"strategy": "flux", "flux-drift-check-every": 0},
    "oracle": {"strategy": "oracle"},
}


@functools.lru_cache(maxsize=1)
def _protocol() -> Any:
    spec = importlib.util.spec_from_file_location(
        "bench", os.path.join(ROOT, "scripts", "benchmark.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def run_config(cell: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The FLUX protocol's run-config for one (shift, level, seed, method) with drift."""
    bench = _protocol()
    cfg = bench.run_config(
        "flux-fmnist",
        {
            "shift": cell["shift"],
            "level": cell["level"],
            "seed": cell["seed"],
            "strategy": "fedavg",
        },
        None,
    )
    cfg.update(METHODS[cell["method"]])
    cfg.update(
        {
            "num-server-rounds": args.rounds,
            "flux-cluster-round": args.cluster_round,
            "drift-round": args.drift_round,
            "drift-fraction": args.drift_fraction,
            "flux-routing-labels-sweep": "",
            "run-name": "drift-{shift}-{level}-{seed}-{method}".format(**cell),
        }
    )
    return cfg


def _key(cell: dict[str, Any]) -> str:
    return json.dumps(cell, sort_keys=True)


def _done() -> set[str]:
    if not os.path.exists(OUT):
        return set()
    with open(OUT) as fh:
        return {json.loads(line)["key"] for line in fh if line.strip()}


def _one(job: tuple[dict[str, Any], argparse.Namespace]) -> str:
    import logging

    import torch

    from flux_app.engine.inprocess import run_inprocess

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    cell, args = job
    cfg = run_config(cell, args)
    t0 = time.time()
    results, _ = run_inprocess(cfg, 12)
    final = results["final"]
    row = {
        "key": _key(cell),
        "cell": cell,
        "drift_round": args.drift_round,
        "cluster_round": args.cluster_round,
        "drift_fraction": args.drift_fraction,
        "accuracy_by_round": [r.get("accuracy") for r in results["rounds"]],
        "reclustered_rounds": final.get("reclustered_rounds"),
        "num_clusters": final.get("num_clusters"),
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}",
    }
    with open(OUT, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    return f"{cell} done in {row['seconds']:.0f} s: reclustered {row['reclustered_rounds']}"


def report() -> str:
    """Mean accuracy per round after the drift, per method (shift x seed means), as markdown."""
    with open(OUT) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    by: dict[tuple, dict[str, list[float]]] = {}
    for r in rows:
        c = r["cell"]
        by.setdefault((c["shift"], c["level"], c["seed"]), {})[c["method"]] = r["accuracy_by_round"]
    complete = {k: v for k, v in by.items() if set(v) == set(METHODS)}
    if not complete:
        return "no complete setting yet"
    d = rows[0]["drift_round"]
    n = len(next(iter(complete.values()))["oracle"])
    lines = [
        f"Settings (shift, level, seed): {', '.join(map(str, sorted(complete)))}; drift at round "
        f"{d}, mean accuracy (%) over the settings; 'gap' = Oracle - FLUX.",
        "",
        "| round | " + " | ".join(METHODS) + " | gap (flux) | gap (flux-blind) |",
        "|---|" + "---|" * (len(METHODS) + 2),
    ]
    for i in range(max(0, d - 2), n):
        means = {m: 100 * sum(v[m][i] for v in complete.values()) / len(complete) for m in METHODS}
        lines.append(
            f"| {i + 1} | "
            + " | ".join(f"{means[m]:.1f}" for m in METHODS)
            + f" | {means['oracle'] - means['flux']:.1f} | {means['oracle'] - means['flux-blind']:.1f} |"
        )
    recl = {
        k: r["reclustered_rounds"]
        for r in rows
        if r["cell"]["method"] == "flux"
        for k in [r["key"]]
    }
    lines += ["", f"FLUX re-clustered at rounds: {sorted(set(map(tuple, recl.values())))}"]
    # per setting: how far behind the Oracle each FLUX is at the drift round, 3 rounds on, last
    at = [d - 1, min(d + 2, n - 1), n - 1]
    lines += [
        "",
        "Per setting, Oracle - method (points) at the drift round, three rounds later and at the "
        "end:",
        "",
        "| shift | level | seed | flux: round "
        + " / ".join(str(i + 1) for i in at)
        + " | flux-blind: round "
        + " / ".join(str(i + 1) for i in at)
        + " |",
        "|---|---|---|---|---|",
    ]
    for key in sorted(complete):
        v = complete[key]

        def gaps(method: str, v: dict = v) -> str:
            return " / ".join(
                f"{round(100 * (v['oracle'][i] - v[method][i]), 1) or 0.0:.1f}" for i in at
            )

        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {gaps('flux')} | {gaps('flux-blind')} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shifts", default="px,py")
    ap.add_argument("--levels", default="4")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--cluster-round", type=int, default=3)
    ap.add_argument("--drift-round", type=int, default=6)
    ap.add_argument("--drift-fraction", type=float, default=0.3)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    if args.report:
        print(report())
        return 0
    done = _done()
    cells = [
        {"shift": s, "level": int(lv), "seed": int(seed), "method": m}
        for s in args.shifts.split(",")
        for lv in args.levels.split(",")
        for seed in args.seeds.split(",")
        for m in args.methods.split(",")
    ]
    todo = [c for c in cells if _key(c) not in done]
    print(f"[drift] {len(todo)} run(s) to do", flush=True)
    with mp.get_context("spawn").Pool(max(1, args.workers)) as pool:
        for line in pool.imap_unordered(_one, [(c, args) for c in todo]):
            print(f"[drift] {line}", flush=True)
    print(report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
