#!/usr/bin/env python
"""Wall and CPU time of methods against a reference on one setting, run alternately in one process.

The benchmark grid runs thousands of seconds on a shared machine, where other work changes
every run's speed; its wall-time ratios scatter. This script measures the ratio the way the
issue asks, side by side: A B A B ... in one process, one torch thread, the same setting and
seed, and records both wall seconds and the process's CPU seconds (less moved by other
processes' load than wall time, but not immune: with another benchmark on the second core,
Oracle, which does FedAvg's exact work, measured 0.93x FedAvg's CPU time). With more than two methods every one is timed against the
LAST one named (the reference); with two, ``wall_ratio`` / ``cpu_ratio`` are first / second.
Results go to docs/benchmarks/wall-ratio.json (FLUX / FedAvg) or ``--output``;
``benchmark.py --report`` shows wall-ratio.json and method-times.json.

Example
-------
    python scripts/wall_ratio.py --shift py --level 4 --repeats 2
    python scripts/wall_ratio.py --strategies flux,oracle,local,pacfl,ifca,fesem,cfl,fedavg \
        --repeats 1 --output docs/benchmarks/method-times.json
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


def _ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median time of ``num`` over median time of ``den``."""
    return statistics.median(times[num]) / statistics.median(times[den])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", default="flux-fmnist")
    parser.add_argument("--shift", default="py")
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--strategies", default="flux,fedavg", help="A,B[,...]: each timed against the last"
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="override num-server-rounds")
    parser.add_argument(
        "--clients", type=int, default=None, help="training clients (flux-fmnist-scale)"
    )
    parser.add_argument("--output", default=OUT)
    args = parser.parse_args()

    import logging

    import torch
    from benchmark import nodes_of, run_config, save_measurement

    from flux_app.engine.inprocess import run_inprocess

    torch.set_num_threads(1)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    names = args.strategies.split(",")
    if len(names) < 2 or len(set(names)) != len(names):
        parser.error("--strategies: at least two distinct methods")
    a, b = names[0], names[-1]
    wall: dict[str, list[float]] = {m: [] for m in names}
    cpu: dict[str, list[float]] = {m: [] for m in names}
    cell = {"shift": args.shift, "level": args.level, "seed": args.seed}
    if args.clients:
        cell["clients"] = args.clients
    nodes = nodes_of(args.protocol, cell)
    for strategy in names:  # untimed: imports, data loading and caches are not what we compare
        cfg = run_config(args.protocol, cell | {"strategy": strategy}, min(2, args.rounds or 2))
        cfg["run-name"] += "-warmup"
        run_inprocess(cfg, nodes)
    for rep in range(args.repeats):
        for strategy in names if rep % 2 == 0 else names[::-1]:  # alternate who goes first
            cfg = run_config(args.protocol, cell | {"strategy": strategy}, args.rounds)
            cfg["run-name"] += "-timing"
            # the benchmark's extra routing columns are not what a user's run pays for
            cfg["flux-routing-labels-sweep"] = ""
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
            "clients": args.clients,
            "nodes": nodes,
            "a": a,
            "b": b,
            "strategies": names,
        },
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "wall_ratio_to_reference": {m: _ratio(wall, m, b) for m in names},
        "cpu_ratio_to_reference": {m: _ratio(cpu, m, b) for m in names},
        "wall_ratio": _ratio(wall, a, b),
        "cpu_ratio": _ratio(cpu, a, b),
    }
    save_measurement(args.output, out)
    for m in names[:-1]:
        print(
            f"[ratio] {m}/{b}: wall {out['wall_ratio_to_reference'][m]:.3f}x, "
            f"CPU {out['cpu_ratio_to_reference'][m]:.3f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
