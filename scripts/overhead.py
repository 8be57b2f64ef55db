#!/usr/bin/env python
"""Overhead of the app against a bare PyTorch loop doing the same federated training.

Runs, in ONE process and alternately (A B A B ...), so that both see the same machine load:

- **app**: FedAvg through the real ServerApp/ClientApp code on the in-process grid
  (:func:`flux_app.engine.inprocess.run_inprocess`): records, messages, validation, results.json;
- **bare**: the same clients' data partitions, model, optimiser, epochs, batch size and
  per-round evaluation written as a plain loop: ``for round: for client: SGD; average``.

The ratio app / bare is what the app's machinery costs on top of the training itself. Results
go to docs/benchmarks/overhead.json (the report shows them in docs/BENCHMARKS.md).

Example
-------
    python scripts/overhead.py --nodes 10 --rounds 2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "docs", "benchmarks", "overhead.json")


def bare_fedavg(
    cfg: Any, num_nodes: int, on_round: Callable[[int, float], None] | None = None
) -> float:
    """FedAvg as a plain PyTorch loop over the same partitions; returns the final mean accuracy.

    ``on_round(round, mean accuracy)``, when given, is called at the end of every round (after
    its evaluation), e.g. to time rounds (scripts/flwr_overhead.py).
    """
    import torch
    from torch import nn

    from flux_app.common.seeding import derive_seed
    from flux_app.engine.client import ClientRuntime, new_model

    data = [ClientRuntime(cfg, pid, num_nodes).data for pid in range(num_nodes)]
    global_model = new_model(cfg, seed=derive_seed(cfg.seed, "init"))
    loss_fn = nn.CrossEntropyLoss()
    acc = 0.0
    for rnd in range(1, cfg.num_server_rounds + 1):
        states, sizes = [], []
        for pid, d in enumerate(data):
            model = new_model(cfg)
            model.load_state_dict(global_model.state_dict())
            model.train()
            opt = torch.optim.SGD(
                model.parameters(), lr=cfg.learning_rate, momentum=cfg.sgd_momentum
            )
            gen = torch.Generator().manual_seed(derive_seed(cfg.seed, pid, rnd))
            for _ in range(cfg.epochs):
                order = torch.randperm(len(d.x_train), generator=gen)
                for start in range(0, len(order), cfg.batch_size):
                    idx = order[start : start + cfg.batch_size]
                    opt.zero_grad(set_to_none=True)
                    loss_fn(model(d.x_train[idx]), d.y_train[idx]).backward()
                    opt.step()
            states.append(model.state_dict())
            sizes.append(len(d.x_train))
        total = sum(sizes)
        global_model.load_state_dict(
            OrderedDict(
                (
                    k,
                    sum(s[k].double() * (n / total) for s, n in zip(states, sizes, strict=True)).to(
                        v.dtype
                    ),
                )
                for k, v in states[0].items()
            )
        )
        global_model.eval()
        with torch.no_grad():  # the app evaluates every client every round: so does this
            accs = []
            for d in data:
                correct = 0
                for start in range(0, len(d.x_test), 512):
                    logits = global_model(d.x_test[start : start + 512])
                    correct += int((logits.argmax(1) == d.y_test[start : start + 512]).sum())
                accs.append(correct / max(len(d.x_test), 1))
                if len(d.x_val):
                    global_model(d.x_val)  # the app's evaluate also scores the val share
        acc = sum(accs) / len(accs)
        if on_round is not None:
            on_round(rnd, acc)
    return acc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fmnist")
    parser.add_argument("--shift", default="px")
    parser.add_argument("--level", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no contention)")
    parser.add_argument("--output", default=OUT)
    args = parser.parse_args()

    import logging

    import torch
    from benchmark import save_measurement  # scripts/benchmark.py

    from flux_app.engine.config import RunConfig
    from flux_app.engine.inprocess import run_inprocess

    torch.set_num_threads(args.threads)
    logging.getLogger("flwr").setLevel(logging.WARNING)
    overrides = {
        "strategy": "fedavg",
        "dataset": args.dataset,
        "shift": args.shift,
        "level": args.level,
        "num-server-rounds": args.rounds,
        "local-epochs": 2,
        "lr": 0.005,
        "momentum": 0.9,
        "batch-size": 64,
        "device": "cpu",
        "output-dir": os.path.join(ROOT, "outputs", "overhead"),
        "run-name": "overhead",
    }
    cfg = RunConfig.from_mapping(overrides)
    bare_fedavg(cfg.replace(num_server_rounds=1), args.nodes)  # load data + warm caches once
    times: dict[str, list[float]] = {"app": [], "bare": []}
    accs: dict[str, float] = {}
    for rep in range(args.repeats):
        for name in ("app", "bare"):
            t0 = time.perf_counter()
            if name == "app":
                results, _ = run_inprocess(overrides, args.nodes)
                accs[name] = results["final"]["accuracy_known"]
            else:
                accs[name] = bare_fedavg(cfg, args.nodes)
            times[name].append(time.perf_counter() - t0)
            print(f"[overhead] repeat {rep + 1} {name}: {times[name][-1]:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(times["app"], times["bare"], strict=True)]
    out = {
        "command": "python scripts/overhead.py " + " ".join(sys.argv[1:]),
        "setting": overrides | {"nodes": args.nodes, "threads": args.threads},
        "seconds": times,
        "ratio_app_over_bare": ratios,
        "median_ratio": statistics.median(ratios),
        "final_accuracy": accs,
    }
    save_measurement(args.output, out)
    print(f"[overhead] app / bare: median {out['median_ratio']:.3f}x ({ratios}) -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
