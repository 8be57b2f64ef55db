#!/usr/bin/env python
"""FedDAG's alpha pick rules on the FedDAG protocol's own clustering inputs (issue #14).

``scripts/alpha_pick_study.py`` compares the pick rules on synthetic distance matrices; this
script compares them where they matter: on the fused distances FedDAG computes from the
protocol's warmed-up clients. Each (setting, seed) runs the FedDAG protocol in process
(``scripts/benchmark.py``'s run-config, 100 FMNIST clients) up to and including its clustering
round (``feddag-warmup-rounds`` + 1 rounds), then re-runs the alpha sweep on that round's fused
distance matrix with both pick rules (``stable``, ``lowest-loss``) and both linkages (UPGMA
``average``, WPGMA ``weighted``), and scores each partition by its adjusted Rand index against
the planted groups. The sweep is a pure function of the matrix, so every rule sees exactly the
same clients. Nothing here is tuned: the rules are the ones the run-config offers.

Results are appended, one JSON line per (setting, seed), to ``--output`` as they finish; a
(setting, seed) already there is skipped, so an interrupted study resumes.

    python scripts/alpha_pick_protocol.py --settings dist1-a1,dist1-a0.25,dist2 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

RULES = [
    (linkage, pick) for linkage in ("average", "weighted") for pick in ("stable", "lowest-loss")
]
OUT = os.path.join(ROOT, "docs", "benchmarks", "alpha-pick-protocol.jsonl")


def study(setting: str, seed: int) -> dict:
    """One (setting, seed): the clustering round's matrix, every rule's partition and ARI."""
    import numpy as np
    from benchmark import PROTOCOLS, run_config
    from sklearn.metrics import adjusted_rand_score

    from flux_app.common.agglomerative import alpha_sweep
    from flux_app.testing import run

    cell = {"setting": setting, "seed": seed, "strategy": "feddag"}
    cfg = run_config("feddag-fmnist", cell, None)
    cfg.pop("output-dir", None)
    cfg.pop("run-name", None)
    rounds = int(cfg.get("feddag-warmup-rounds", 2)) + 1  # the clustering round is the next
    cfg["num-server-rounds"] = rounds
    cfg["device"] = "cpu"
    t0 = time.time()
    _, s = run(cfg, PROTOCOLS["feddag-fmnist"]["nodes"])
    ids = s.population[0]
    truth = [s.nodes[n].group for n in ids]
    a = np.asarray(s.distances.a)
    out = {
        "setting": setting,
        "seed": seed,
        "clients": len(ids),
        "groups": len(set(truth)),
        "run_seconds": round(time.time() - t0, 1),
        "run_alpha": float(s.sweep.alpha),
        "rules": {},
    }
    opts = s.opts
    for linkage, pick in RULES:
        sweep = alpha_sweep(a, step=opts.alpha_step, lam=opts.lambda_, linkage=linkage, pick=pick)
        labels = [int(z) for z in sweep.labels]
        out["rules"][f"{linkage}/{pick}"] = {
            "alpha": float(sweep.alpha),
            "clusters": len(set(labels)),
            "ari": round(float(adjusted_rand_score(truth, labels)), 4),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--settings", default="dist1-a1,dist1-a0.25,dist2")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--output", default=OUT)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(int(os.environ.get("FLUX_BENCH_THREADS", "1")))
    done = set()
    if os.path.exists(args.output):
        with open(args.output) as f:
            done = {(r["setting"], r["seed"]) for r in map(json.loads, f) if r}
    for setting in args.settings.split(","):
        for seed in (int(x) for x in args.seeds.split(",")):
            if (setting, seed) in done:
                print(f"[alpha-pick] {setting} seed {seed}: done already", flush=True)
                continue
            print(f"[alpha-pick] {setting} seed {seed}: running", flush=True)
            row = study(setting, seed)
            with open(args.output, "a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
            cells = ", ".join(
                f"{k} {v['ari']:.2f} ({v['clusters']})" for k, v in row["rules"].items()
            )
            print(f"[alpha-pick] {setting} seed {seed}: {cells}", flush=True)


if __name__ == "__main__":
    main()
