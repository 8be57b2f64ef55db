#!/usr/bin/env python
"""A simulated protocol round against its arithmetic limit (issue #15).

The limit of a round is its floating-point work divided by what this machine's cores can do at
best: the round's FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over every
torch operation of an in-process run (``flux_app.testing.run``: the real ClientApp handlers and
the real strategy in one process, so training, evaluation and descriptors are all counted), and
the machine's rate is the dense-GEMM rate measured here (``torch.mm`` of float32 square matrices
on the same threads). The same run, without the counter (it slows dispatch), gives the wall time.

    python scripts/arith_limit.py --conf conf/flux-fmnist-px-L4.toml --nodes 12 --rounds 3

Prints and writes (``--output``) the FLOPs, the GEMM rate, the limit, the measured seconds and
their ratio, in total and per round (per-round FLOPs from a counter reset at each round's
first message).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def gemm_rate(size: int = 2048, seconds: float = 3.0) -> float:
    """Best dense float32 matrix-multiply rate of this process's torch threads (FLOP/s)."""
    import torch

    a = torch.randn(size, size)
    b = torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    best = 0.0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        torch.mm(a, b)
        best = max(best, 2.0 * size**3 / (time.perf_counter() - t))
    return best


def run(cfg: dict[str, Any], nodes: int, count: bool) -> tuple[dict[str, Any], list[float]]:
    """One in-process run; with ``count`` the FLOPs of each round (by the messages' round)."""
    from torch.utils.flop_counter import FlopCounterMode

    from flux_app import testing
    from flux_app.engine.inprocess import InProcessGrid

    per_round: dict[int, float] = {}
    counter = FlopCounterMode(display=False) if count else None
    original = InProcessGrid.push_messages
    current = {"round": 0, "base": 0}

    def push(self, messages):  # noqa: ANN001, ANN202 - attribute the FLOPs to the round
        messages = list(messages)
        rounds = {int(m.metadata.group_id or 0) for m in messages}
        if counter is not None and rounds:
            total = counter.get_total_flops()
            per_round[current["round"]] = per_round.get(current["round"], 0.0) + (
                total - current["base"]
            )
            current["round"], current["base"] = max(rounds), total
        return original(self, messages)

    InProcessGrid.push_messages = push
    try:
        if counter is None:
            results, _ = testing.run(cfg, nodes)
        else:
            with counter:
                results, _ = testing.run(cfg, nodes)
            total = counter.get_total_flops()
            per_round[current["round"]] = per_round.get(current["round"], 0.0) + (
                total - current["base"]
            )
    finally:
        InProcessGrid.push_messages = original
    rounds = int(cfg["num-server-rounds"])
    # round 0 = discovery (query.info); the final routing/evaluation is counted in the last round
    flops = [per_round.get(r, 0.0) for r in range(1, rounds + 1)]
    if flops:
        flops[-1] += sum(v for r, v in per_round.items() if r > rounds)
    return results, flops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--conf", default=os.path.join(ROOT, "conf", "flux-fmnist-px-L4.toml"))
    ap.add_argument("--nodes", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", default="{}", help="JSON run-config overrides")
    ap.add_argument(
        "--output", default=os.path.join(ROOT, "docs", "benchmarks", "arith-limit.json")
    )
    args = ap.parse_args()
    import torch

    with open(args.conf, "rb") as fh:
        cfg = tomllib.load(fh)
    cfg |= {"num-server-rounds": args.rounds, "seed": 0} | json.loads(args.set)
    rate = gemm_rate()
    print(f"[arith] GEMM rate {rate / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} thread(s)")
    t = time.perf_counter()
    results, _ = run(cfg, args.nodes, count=False)
    wall = time.perf_counter() - t
    seconds = [float(r["seconds"]) for r in results["rounds"]]
    _, flops = run(cfg, args.nodes, count=True)
    rows = [
        {
            "round": i + 1,
            "phase": results["rounds"][i].get("phase"),
            "gflop": round(f / 1e9, 2),
            "limit_s": round(f / rate, 3),
            "seconds": round(s, 3),
            "ratio": round(s / (f / rate), 2) if f else None,
        }
        for i, (f, s) in enumerate(zip(flops, seconds, strict=True))
    ]
    total_f, total_s = sum(flops), sum(seconds)
    report = {
        "command": "python scripts/arith_limit.py " + " ".join(sys.argv[1:]),
        "conf": os.path.relpath(args.conf, ROOT),
        "nodes": args.nodes,
        "overrides": json.loads(args.set),
        "machine": {
            "nproc": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "gemm_gflops": round(rate / 1e9, 2),
        "rounds": rows,
        "total": {
            "gflop": round(total_f / 1e9, 2),
            "limit_s": round(total_f / rate, 2),
            "seconds": round(total_s, 2),
            "ratio": round(total_s / (total_f / rate), 2) if total_f else None,
            "wall_with_start_s": round(wall, 1),
        },
    }
    for r in rows:
        print(
            f"[arith] round {r['round']} ({r['phase']}): {r['gflop']} GFLOP, limit "
            f"{r['limit_s']} s, measured {r['seconds']} s: {r['ratio']}x"
        )
    print(f"[arith] total: {report['total']}")
    with open(args.output, "w") as fh:
        json.dump(report, fh, indent=1)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
