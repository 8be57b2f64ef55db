#!/usr/bin/env python
"""Wall and CPU time of FLUX against FedAvg on one setting, run alternately in one process.

The benchmark grid runs thousands of seconds on a shared machine, where other work changes
every run's speed; its wall-time ratios scatter. This script measures the ratio the way the
issue asks, side by side: A B A B ... in one process, one torch thread, the same setting and
seed, and records both wall seconds and the process's CPU seconds (the latter is barely
touched by other processes' load). Results go to docs/benchmarks/wall-ratio.json, which
``benchmark.py --report`` shows.

Example
-------
    python scripts/wall_ratio.py --shift py --level 4 --repeats 2
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "benchmarks", "wall-ratio.json")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="flux-fmnist")
    parser.add_argument("--shift", default="py")
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", default="flux,fedavg", help="A,B: ratio A / B")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--output", default=OUT)
    args = parser.parse_args()

    import logging

    import torch
    from benchmark import PROTOCOLS, run_config, save_measurement

    from flux_app.inprocess import run_inprocess

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    a, b = args.strategies.split(",")
    nodes = PROTOCOLS[args.protocol]["nodes"]
    wall: dict[str, list[float]] = {a: [], b: []}
    cpu: dict[str, list[float]] = {a: [], b: []}
    cell = {"shift": args.shift, "level": args.level, "seed": args.seed}
    for strategy in (a, b):  # untimed: imports, data loading and caches are not what we compare
        cfg = run_config(args.protocol, cell | {"strategy": strategy}, 2)
        cfg["run-name"] += "-warmup"
        run_inprocess(cfg, nodes)
    for rep in range(args.repeats):
        for strategy in (a, b) if rep % 2 == 0 else (b, a):  # alternate who goes first
            cfg = run_config(args.protocol, cell | {"strategy": strategy}, None)
            cfg["run-name"] += "-timing"
            t0, c0 = time.perf_counter(), time.process_time()
            run_inprocess(cfg, nodes)
            wall[strategy].append(time.perf_counter() - t0)
            cpu[strategy].append(time.process_time() - c0)
            print(
                f"[ratio] repeat {rep + 1} {strategy}: {wall[strategy][-1]:.1f} s wall, "
                f"{cpu[strategy][-1]:.1f} s CPU",
                flush=True,
            )
    out = {
        "command": "python scripts/wall_ratio.py " + " ".join(sys.argv[1:]),
        "setting": {
            "protocol": args.protocol,
            "shift": args.shift,
            "level": args.level,
            "seed": args.seed,
            "a": a,
            "b": b,
        },
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "wall_ratio": statistics.median(wall[a]) / statistics.median(wall[b]),
        "cpu_ratio": statistics.median(cpu[a]) / statistics.median(cpu[b]),
    }
    save_measurement(args.output, out)
    print(f"[ratio] {a}/{b}: wall {out['wall_ratio']:.3f}x, CPU {out['cpu_ratio']:.3f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
