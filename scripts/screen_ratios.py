"""How far apart honest replies are: what the engine's outlier screen must leave alone.

Runs strategies in process with the screen off and records, for every train reply, its trained
model's and its update's length over the lower median of the others in its screening group
(``ClusteredStrategy.screen_group``, ``flux_app.engine.screening``), the quantities that ``max-model-norm-ratio`` and
``max-update-norm-ratio`` bound (docs/RELIABILITY.md, "Bad input").

    python scripts/screen_ratios.py --settings synthetic-label-skew,digits-px-L2
    python scripts/screen_ratios.py --protocol feddag-fmnist --setting dist1-a0.25 \\
        --strategies ifca,feddag --rounds 20
    python scripts/screen_ratios.py --sizes fmnist,digits   # train sizes (max-train-size-ratio)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]

import torch  # noqa: E402

from flux_app.common.params import update_length  # noqa: E402
from flux_app.engine import strategy as base  # noqa: E402
from flux_app.engine.inprocess import run_inprocess  # noqa: E402

OFF = {"max-model-norm-ratio": 0.0, "max-update-norm-ratio": 0.0}


def _ratios(lengths: dict[int, float]) -> list[float]:
    out = []
    for node, value in lengths.items():
        others = sorted(v for n, v in lengths.items() if n != node)
        if others:
            out.append(value / max(others[(len(others) - 1) // 2], 1e-30))
    return out


def record_ratios() -> dict[str, list[float]]:
    """Patch the screen so that it records every group's ratios (then screens as configured)."""
    seen: dict[str, list[float]] = {"model": [], "update": []}
    screen = base.screen_replies  # what collect_trained calls

    def recording(self: Any, replies: list[Any], sent: Any) -> list[Any]:
        groups: dict[Any, list[Any]] = {}
        for r in replies:
            groups.setdefault(self.screen_group(r), []).append(r)
        for members in groups.values():
            lengths: dict[str, dict[int, float]] = {"model": {}, "update": {}}
            for r in members:
                start = sent.get(r.node_id)
                if start is None and r.cluster is not None:
                    start = self.models.get(r.cluster)
                if start is not None:
                    lengths["update"][r.node_id] = update_length(start, r.state)
                    lengths["model"][r.node_id] = update_length({}, r.state)
            for what in seen:
                seen[what] += _ratios(lengths[what])
        return screen(self, replies, sent)

    base.screen_replies = recording
    return seen


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)
    return f"max {v[-1]:.3f} p99 {v[int(0.99 * (len(v) - 1))]:.3f}"


def size_ratios(datasets: list[str]) -> None:
    """Largest train size over the others' lower median, label-skew partitions (rho 0.2)."""
    from flux_app.data.shifts import ShiftSpec, partition_plan
    from flux_app.data.sources import load_source

    for name in datasets:
        source = load_source(name)
        for alpha in (1.0, 0.25, 0.1):
            for clients in (10, 30, 100):
                worst = 0.0
                for seed in (0, 1, 2):
                    spec = ShiftSpec("label-skew", alpha=alpha, rho=0.2, seed=seed, val_fraction=0)
                    sizes = {
                        i: float(len(p.train_idx))
                        for i, p in enumerate(partition_plan(source, spec, clients))
                    }
                    worst = max(worst, *_ratios(sizes))
                print(
                    f"[screen-ratios] {name} label-skew alpha {alpha} {clients} clients, seeds "
                    f"0-2: largest train size / others' lower median {worst:.1f}",
                    flush=True,
                )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--settings", default="", help="regression settings (scripts/regression.py)")
    ap.add_argument("--protocol", default="", help="a benchmark protocol (scripts/benchmark.py)")
    ap.add_argument("--setting", default="", help="the protocol's setting")
    ap.add_argument("--strategies", default="fedavg,flux,feddag,ifca,cfl,fesem,pacfl,oracle")
    ap.add_argument("--rounds", type=int, default=0, help="num-server-rounds (0: the setting's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sizes", default="", help="datasets whose train sizes to compare instead")
    args = ap.parse_args()
    if args.sizes:
        size_ratios(args.sizes.split(","))
        return 0
    torch.set_num_threads(1)
    seen = record_ratios()
    runs: list[tuple[str, dict[str, Any], int]] = []
    if args.protocol:
        import benchmark

        proto = benchmark.PROTOCOLS[args.protocol]
        cfg = proto["config"] | proto["settings"].get(args.setting, {}) | {"eval-every": 100}
        runs.append((f"{args.protocol} {args.setting}", cfg, proto["nodes"]))
    for setting in (s for s in args.settings.split(",") if s):
        import regression

        runs.append((setting, regression.SETTINGS[setting], regression.NODES[setting]))
    if not runs:
        ap.error("give --settings or --protocol")
    for name, cfg, nodes in runs:
        for strategy in args.strategies.split(","):
            for values in seen.values():
                values.clear()
            t0 = time.time()
            extra = {"num-server-rounds": args.rounds} if args.rounds else {}
            with tempfile.TemporaryDirectory() as tmp:
                overrides = (
                    cfg
                    | OFF
                    | extra
                    | {
                        "strategy": strategy,
                        "seed": args.seed,
                        "device": "cpu",
                        "output-dir": tmp,
                        "run-name": "r",
                    }
                )
                run_inprocess(overrides, nodes)
            print(
                f"[screen-ratios] {name} {strategy}: {len(seen['update'])} replies; "
                f"model {summary(seen['model'])}; update {summary(seen['update'])} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
