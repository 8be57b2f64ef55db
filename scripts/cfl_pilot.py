#!/usr/bin/env python
"""Pilot for CFL's eps1 / eps2 on a benchmark protocol: the update norms it would compare.

CFL's split test compares ABSOLUTE update norms with eps1 (mean update of a cluster) and eps2
(largest client update), so its thresholds depend on the model, learning rate and local epochs.
This script runs CFL on one setting of a protocol with a PILOT seed (not an evaluation seed) and
splitting disabled, and prints each round's ``(mean-update norm, max client-update norm)``
(results.json ``cfl_norms``). With ``--save`` the norms are added to
docs/benchmarks/cfl-pilot.json, which docs/DECISIONS.md cites for the values the protocols use.

Example
-------
    python scripts/cfl_pilot.py flux-fmnist '{"shift": "py", "level": 4}' --save
    python scripts/cfl_pilot.py feddag-fmnist '{"setting": "dist1-a1"}' --rounds 4 --save
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))

from benchmark import PROTOCOLS, RESULTS_DIR, machine, run_config  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", choices=sorted(PROTOCOLS))
    parser.add_argument("setting", help="JSON object of the cell without strategy and seed")
    parser.add_argument("--seed", type=int, default=1, help="pilot seed (default 1)")
    parser.add_argument("--rounds", type=int, help="override num-server-rounds")
    parser.add_argument("--save", action="store_true", help="add to docs/benchmarks/cfl-pilot.json")
    args = parser.parse_args()
    threads = os.environ.get("FLUX_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    from flux_app.engine.inprocess import run_inprocess

    logging.getLogger("flwr").setLevel(logging.WARNING)
    cell = json.loads(args.setting) | {"seed": args.seed, "strategy": "cfl"}
    cfg = run_config(args.protocol, cell, args.rounds)
    cfg["cfl-min-round"] = 10**6  # norms only: never split
    cfg["output-dir"] = os.path.join(ROOT, "outputs", "pilots")
    results, _ = run_inprocess(cfg, PROTOCOLS[args.protocol]["nodes"])
    norms = []
    for row in results["rounds"]:
        mean, largest = row["cfl_norms"]["0"]
        norms.append([row["round"], round(mean, 4), round(largest, 4)])
        print(
            f"round {row['round']}: mean-update norm {mean:.3f}, max client-update norm {largest:.3f}"
        )
    if args.save:
        path = os.path.join(RESULTS_DIR, "cfl-pilot.json")
        data = {}
        if os.path.exists(path):
            with open(path) as fh:
                data = json.load(fh)
        key = f"{args.protocol} {json.dumps(cell, sort_keys=True)}"
        data[key] = {"command": " ".join(sys.argv), "machine": machine(), "round_mean_max": norms}
        with open(path, "w") as fh:
            json.dump(data, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
