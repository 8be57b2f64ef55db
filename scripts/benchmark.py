#!/usr/bin/env python
"""Benchmark harness: a grid of (strategy x shift x level x seed) runs of one paper protocol.

Every run goes through the real ServerApp and ClientApp code, driven by the in-process grid
(:mod:`flux_app.engine.inprocess`: no Ray, no SuperLink; tests/test_e2e_flwr.py checks it
gives the same results as ``flwr run`` for the same seed). Each finished run appends one JSON
line to the protocol's results file; a rerun skips what is there, so a long grid can be finished
over several sittings (or on a GPU machine) and interrupted at any point without losing runs.
``--report`` turns every results file into docs/BENCHMARKS.md tables and PNG plots.

Examples
--------
    python scripts/benchmark.py flux-fmnist --seeds 0 --levels 1,4,8         # run (resumes)
    python scripts/benchmark.py flux-fmnist --list                           # what is left
    python scripts/benchmark.py feddag-fmnist --strategies feddag,fedavg --rounds 20
    python scripts/benchmark.py --report                                     # docs only
    python scripts/benchmark.py flux-fmnist --workers 2                      # 2 processes

A run interrupted part-way (killed, or the sitting ended) resumes after its last checkpointed
round when the same command runs again on the same run folders (``--runs-dir``); ``--rounds R``
other than the protocol's own writes ``<protocol>-r<R>.jsonl``, a separate experiment.

``--workers N`` runs the grid in N processes of one torch thread each; the settings with work
left (a setting = all methods of one shift/level/seed, run back to back so that wall-time ratios
compare runs made under the same load) are dealt to them round-robin in grid order. On a 2-core machine two single-thread
workers train ~1.3x faster than one two-thread process (measured: 2 x 5.0k vs 7.9k LeNet-5
samples/s).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS_DIR = os.path.join(ROOT, "docs", "benchmarks")

from flux_app.engine.registry import STRATEGIES, load_plugins  # noqa: E402  (after the path set-up)

load_plugins()  # the built-in methods register their strategies

# Each protocol: nodes, fixed run-config, and the default grid. Paper settings in one place;
# conf/*.toml carries the same values for `flwr run`.
PROTOCOLS: dict[str, dict[str, Any]] = {
    "digits-px": {
        "title": "Every method on the embedded digits data (shift px, level 2)",
        "nodes": 12,
        "config": {
            "dataset": "digits",
            "shift": "px",
            "level": 2,
            "holdout-clients": 0,
            "num-server-rounds": 8,
            "local-epochs": 10,
            "lr": 0.05,
            "momentum": 0.5,
            "batch-size": 64,
            "model": "lenet5",
        },
        "grid": {
            "strategy": [s for s in STRATEGIES if s != "kmeans-flux"],  # kmeans-flux: an example
            "seed": [0, 1, 2],
        },
    },
    "flux-fmnist": {
        "title": "FLUX protocol on Fashion-MNIST (FLUX, NeurIPS 2025)",
        "nodes": 12,
        "config": {
            "dataset": "fmnist",
            "holdout-clients": 2,
            "num-server-rounds": 10,
            "local-epochs": 2,
            "lr": 0.005,
            "momentum": 0.9,
            "batch-size": 64,
            "val-fraction": 0.2,
            "model": "lenet5",
            # PACFL's threshold, tuned per dataset as its paper does: the pilot
            # `python scripts/pacfl_threshold.py flux-fmnist --seed 1 --save` (seed 1 is not an
            # evaluation seed; it reads the planted groups: generous to PACFL)
            "pacfl-threshold": 0.552,
            # CFL: the paper's eps1, eps2 scaled to this model's update norms and a first split
            # check at round 3 of 10 (pilots: scripts/cfl_pilot.py, docs/DECISIONS.md)
            "cfl-eps1": 0.4,
            "cfl-eps2": 0.6,
            "cfl-min-round": 3,
            # few-label routing reported from the same run (FLUX only; issue #14)
            "flux-routing-labels-sweep": "1,5,20",
        },
        # IFCA / FeSEM are told K = the number of planted groups among the training clients
        "k-from-groups": True,
        "grid": {
            "strategy": ["flux", "fedavg", "oracle", "local", "pacfl", "ifca", "fesem", "cfl"],
            "shift": ["px", "py", "pyx", "pxy"],
            "level": [1, 4, 8],
            "seed": [0, 1, 2],
        },
    },
    # The FLUX paper's scaling study: the FLUX protocol with 25 / 50 / 100 training clients (the
    # `clients` axis; + the protocol's 2 held-out clients), level 4, every method (issue #14);
    # local epochs scale with the clients and 10 clients train a round, so that a round's SGD
    # steps and work stay the protocol's.
    "flux-fmnist-scale": {
        "title": "FLUX protocol with more clients (the FLUX paper's scaling study)",
        "nodes": 12,  # replaced per cell by clients + holdout-clients
        "config": {},  # = flux-fmnist's (filled below)
        "k-from-groups": True,
        "grid": {
            "strategy": ["flux", "fedavg", "oracle", "local", "pacfl", "ifca", "fesem", "cfl"],
            "clients": [25, 50, 100],
            "shift": ["px", "py", "pyx", "pxy"],
            "level": [4],
            "seed": [0],
        },
    },
    "feddag-fmnist": {
        "title": "FedDAG protocol on Fashion-MNIST (FedDAG, ICLR 2026)",
        "nodes": 100,
        "config": {
            "dataset": "fmnist",
            "fraction-train": 0.2,
            "num-server-rounds": 20,
            "local-epochs": 10,
            "lr": 0.01,
            "momentum": 0.5,
            "weight-decay": 1e-4,
            "batch-size": 64,
            "model": "cnn",
            "eval-every": 5,
            "val-fraction": 0.0,
            # `python scripts/pacfl_threshold.py feddag-fmnist --seed 1 --save` (see flux-fmnist)
            "pacfl-threshold": 4.842,
            "cfl-eps1": 0.4,  # as flux-fmnist (pilot: scripts/cfl_pilot.py)
            "cfl-eps2": 0.6,
            "cfl-min-round": 3,
        },
        "grid": {
            "strategy": ["feddag", "fedavg", "pacfl", "ifca", "cfl"],
            # Dist I (rho 20 %, alpha' 1 and 0.25) and Dist II
            "setting": ["dist1-a1", "dist1-a0.25", "dist2"],
            "seed": [0],
        },
        "settings": {
            # num-clusters (IFCA / FeSEM only): the number of planted groups, as their papers
            # assume K known; the clustering methods are not told it
            "dist1-a1": {"shift": "label-skew", "rho": 0.2, "alpha": 1.0, "num-clusters": 5},
            "dist1-a0.25": {"shift": "label-skew", "rho": 0.2, "alpha": 0.25, "num-clusters": 5},
            "dist2": {"shift": "concept", "num-clusters": 3},
            # Dist III (Dirichlet label skew, no planted groups): not in the default grid; the
            # dual-encoder ablation's setting where clusters share features (issue #15)
            "dist3-a0.25": {"shift": "dirichlet", "alpha": 0.25},
            # a Dirichlet mixture of 4 planted groups (alpha 0.5): clusters that overlap in
            # classes, the setting where complementary sharing should help if anywhere (#15)
            "dist3-mix4": {
                "shift": "dirichlet-groups",
                "level": 4,
                "alpha": 0.5,
                "num-clusters": 4,
            },
        },
    },
}

PROTOCOLS["flux-fmnist-scale"]["config"] = {
    **PROTOCOLS["flux-fmnist"]["config"],
    "flux-routing-labels-sweep": "5",
}


def nodes_of(protocol: str, cell: dict[str, Any]) -> int:
    """Simulated nodes of one cell: its ``clients`` (+ the held-out ones), else the protocol's."""
    spec = PROTOCOLS[protocol]
    if "clients" in cell:
        return int(cell["clients"]) + int(spec["config"].get("holdout-clients", 0))
    return int(spec["nodes"])


# Strategy-specific run-config of a protocol (variants are strategies of the grid).
VARIANTS: dict[str, dict[str, Any]] = {
    "feddag*": {"strategy": "feddag", "feddag-variant": "single"},
    "feddag-dagger": {"strategy": "feddag", "feddag-variant": "dagger"},
    # FLUX with descriptors on the paper's layer (LeNet-5's 400-d conv output, issue #14)
    "flux-conv": {"strategy": "flux", "flux-descriptor-layer": "conv"},
}

PAPER = {
    "flux-fmnist": {
        "note": "FLUX paper, FMNIST, test-phase accuracy averaged over the 4 shifts",
        "flux_by_level": {1: 78.6, 4: 80.5, 8: 84.3},
        "best_baseline_level8": 61.5,
        "flux_mean_levels_1_8": 81.2,
        "best_baseline_mean_levels_1_8": 69.4,
    },
    "feddag-fmnist": {
        "note": "FedDAG paper, FMNIST, best accuracy over rounds (their code's metric)",
        "dist1-a1": {"feddag": 96.82, "pacfl": 94.41, "ifca": 94.03, "cfl": 86.97},
        "dist1-a0.25": {"feddag": 93.82},
        "dist2": {"feddag": 88.93, "ifca": 84.67, "cfl": 82.73},
    },
}


#: methods that are given the number of clusters (the others find it or do not cluster)
TOLD_K = ("ifca", "fesem", "kmeans-flux")


def budget_suffix(protocol: str, rounds: int | None) -> str:
    """``""`` at the protocol's own round budget, ``"-r<R>"`` for another one: a run of another
    length is another experiment, with its own results file and run folders."""
    if not rounds or rounds == PROTOCOLS[protocol]["config"]["num-server-rounds"]:
        return ""
    return f"-r{rounds}"


def results_file(protocol: str, rounds: int | None = None) -> str:
    """The protocol's JSON-lines results file (at ``rounds`` rounds, when not its own)."""
    return os.path.join(RESULTS_DIR, f"{protocol}{budget_suffix(protocol, rounds)}.jsonl")


def run_key(cell: dict[str, Any]) -> str:
    """Identity of one run inside a protocol (its grid coordinates)."""
    return json.dumps(cell, sort_keys=True)


def cells(protocol: str, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """Grid cells, narrowed by the command-line filters."""
    grid = dict(PROTOCOLS[protocol]["grid"])
    for axis in grid:
        chosen = getattr(args, axis.replace("-", "_") + "s", None)
        if chosen:
            grid[axis] = (
                [type(grid[axis][0])(v) for v in chosen.split(",")]
                if grid[axis]
                else chosen.split(",")
            )
    axes = list(grid)
    # Methods vary fastest so that the runs of one setting are measured side by side.
    order = [a for a in axes if a != "strategy"] + ["strategy"]
    for values in itertools.product(*(grid[a] for a in order)):
        yield dict(zip(order, values, strict=True))


def run_config(
    protocol: str, cell: dict[str, Any], rounds: int | None, runs_dir: str | None = None
) -> dict[str, Any]:
    """Full run-config of one cell; its run folder goes under ``runs_dir`` (default
    outputs/benchmarks)."""
    spec = PROTOCOLS[protocol]
    cfg = dict(spec["config"])
    for axis, value in cell.items():
        if axis == "setting":
            cfg.update(spec["settings"][value])
        elif axis == "clients":
            # The 10-client protocol's work per round at any size: a client holds 10 / clients
            # of the data, so it trains clients / 10 times the epochs (the protocol's SGD steps;
            # at 2 epochs a 100-client run stayed near chance), and 10 clients are sampled a
            # round (all of them would be clients / 10 times the work: ~1 h a run here).
            base = spec["nodes"] - cfg.get("holdout-clients", 0)
            cfg["local-epochs"] = max(1, round(cfg["local-epochs"] * value / base))
            cfg["fraction-train"] = min(1.0, base / value)
        elif axis == "strategy":
            cfg.update(VARIANTS.get(value, {"strategy": value}))
        else:
            cfg[axis] = value
    if spec.get("k-from-groups") and cfg["strategy"] in TOLD_K:
        cfg["num-clusters"] = planted_groups(cfg, nodes_of(protocol, cell))
    if rounds:
        cfg["num-server-rounds"] = rounds
    name = "-".join(str(v) for v in cell.values()).replace("*", "star")
    cfg["run-name"] = f"bench-{protocol}-{name}{budget_suffix(protocol, rounds)}"
    cfg["output-dir"] = os.path.abspath(runs_dir or os.path.join(ROOT, "outputs", "benchmarks"))
    return cfg


def resume_point(cfg: dict[str, Any]) -> int:
    """The last checkpointed round of this run's folder, left by an interrupted sitting (0: start
    afresh). A checkpoint that this run-config cannot continue (another strategy or setting, or
    a finished run whose results line was lost) is not resumed: the run starts over."""
    from flux_app.common.statecodec import StateError
    from flux_app.engine import checkpoint
    from flux_app.engine.config import ConfigError, RunConfig

    folder = os.path.join(cfg["output-dir"], cfg["run-name"])
    if not os.path.isfile(os.path.join(folder, checkpoint.FILE)):
        return 0
    try:
        saved = checkpoint.read(folder)
        checkpoint.check_compatible(saved, RunConfig.from_mapping(cfg), cfg["strategy"])
    except (ConfigError, StateError) as err:
        print(f"[bench]    not resuming {folder}: {err}", flush=True)
        return 0
    done = int(saved["round"])
    return done if done < cfg["num-server-rounds"] else 0


def planted_groups(cfg: dict[str, Any], nodes: int) -> int:
    """Number of distinct ground-truth groups among the training clients of a run-config."""
    from flux_app.data import load_source, partition_groups
    from flux_app.engine.client import shift_spec
    from flux_app.engine.config import RunConfig

    rc = RunConfig.from_mapping(cfg)
    source = load_source(rc.dataset, rc.data_root, rc.seed)
    groups = partition_groups(source, shift_spec(rc), nodes)[: nodes - rc.holdout_clients]
    return len(set(groups.tolist()))


def load_done(protocol: str, rounds: int | None = None) -> dict[str, dict[str, Any]]:
    """Finished runs of a protocol (at ``rounds`` rounds, when not its own) by run key."""
    path = results_file(protocol, rounds)
    done: dict[str, dict[str, Any]] = {}
    if os.path.exists(path):
        with open(path) as fh:
            for line in fh:
                if line.strip():
                    row = json.loads(line)
                    done[row["key"]] = row
    return done


def run_grid(protocol: str, args: argparse.Namespace) -> int:
    """Run every missing cell; returns the number of failures."""
    from flux_app.engine.inprocess import run_inprocess

    logging.getLogger("flwr").setLevel(logging.WARNING if args.quiet else logging.INFO)
    done = load_done(protocol, args.rounds)
    grid = list(cells(protocol, args))
    todo = [c for c in grid if run_key(c) not in done]
    if args.shard:  # settings with work left, dealt round-robin in grid order
        index, count = args.shard
        left = list(dict.fromkeys(_setting(c) for c in todo))
        mine = {s for i, s in enumerate(left) if i % count == index}
        todo = [c for c in todo if _setting(c) in mine]
    if args.max_runs:
        todo = todo[: args.max_runs]
    tag = f"[bench {args.shard[0] + 1}/{args.shard[1]}]" if args.shard else "[bench]"
    print(f"{tag} {protocol}: {len(todo)} run(s) to do", flush=True)
    if args.list:
        for c in todo:
            print("  ", run_key(c))
        return 0
    os.makedirs(RESULTS_DIR, exist_ok=True)
    failures = 0
    for i, cell in enumerate(todo, 1):
        cfg = run_config(protocol, cell, args.rounds, args.runs_dir)
        if args.device:
            cfg["device"] = args.device
        t0 = time.time()
        print(f"{tag} ({i}/{len(todo)}) {run_key(cell)}", flush=True)
        folder = os.path.join(cfg["output-dir"], cfg["run-name"])
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "bench_cell.json"), "w") as fh:  # the report's label
            json.dump(cell, fh)
        resumed = resume_point(cfg)
        if resumed:  # an earlier sitting was interrupted: go on after its last checkpoint
            cfg["resume-from"] = cfg["run-name"]
            print(f"{tag}    resuming after round {resumed}", flush=True)
        try:
            results, run_dir = run_inprocess(cfg, nodes_of(protocol, cell))
        except Exception:  # one failing cell must not stop a long grid
            failures += 1
            traceback.print_exc()
            continue
        final = results["final"]
        row = {
            "key": run_key(cell),
            "cell": cell,
            "run_config": cfg,
            "final": final,
            "clustering": {
                k: v for k, v in (results.get("clustering") or {}).items() if k != "assignment"
            },
            "accuracy_by_round": [r.get("accuracy") for r in results["rounds"]],
            "seconds": round(time.time() - t0, 2),
            # over every sitting of a resumed run: the rounds' own times (start-ups apart)
            "rounds_seconds": round(sum(r.get("seconds") or 0.0 for r in results["rounds"]), 2),
            "resumed_after_round": resumed,
            "machine": machine(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "run_dir": os.path.relpath(run_dir, ROOT),
        }
        # one write of one line: workers appending to the same file never interleave lines
        with open(results_file(protocol, args.rounds), "a") as fh:
            fh.write(json.dumps(row) + "\n")
        show = {
            k: final.get(k)
            for k in (
                "accuracy_known",
                "accuracy_routed",
                "accuracy_holdout",
                "num_clusters",
                "ari",
            )
        }
        print(f"{tag}    done in {row['seconds']:.0f} s: {json.dumps(show)}", flush=True)
    return failures


def _setting(cell: dict[str, Any]) -> str:
    """A cell's setting: everything but the method (the unit a worker takes)."""
    return run_key({k: v for k, v in cell.items() if k != "strategy"})


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N, e.g. 1/2; got {text!r}") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be in 1..N")
    return index - 1, count


def run_workers(argv: list[str], workers: int) -> int:
    """Run this script ``workers`` times in parallel, one shard and one thread each."""
    base = [a for a in argv if a != "--report"]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *base, "--shard", f"{i}/{workers}"],
            env=os.environ | {"FLUX_BENCH_THREADS": "1"},
        )
        for i in range(1, workers + 1)
    ]
    return sum(1 for p in procs if p.wait() != 0)


def save_measurement(path: str, record: dict[str, Any]) -> None:
    """Write a one-off measurement (scripts/overhead.py, wall_ratio.py) with where and when."""
    record = record | {
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(record, fh, indent=2)


def machine() -> str:
    """A one-line description of where the numbers come from."""
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{platform.machine()} {os.cpu_count()} cores, {dev}, torch {torch.__version__}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("protocol", nargs="?", choices=sorted(PROTOCOLS))
    parser.add_argument("--strategys", "--strategies", dest="strategys", help="comma list")
    parser.add_argument("--shifts", help="comma list (flux-fmnist)")
    parser.add_argument("--levels", help="comma list (flux-fmnist)")
    parser.add_argument("--settings", help="comma list (feddag-fmnist)")
    parser.add_argument("--seeds", help="comma list")
    parser.add_argument("--clientss", "--clients", dest="clientss", help="comma list (scale)")
    parser.add_argument("--rounds", type=int, help="override num-server-rounds")
    parser.add_argument("--device", help="auto | cpu | cuda")
    parser.add_argument(
        "--runs-dir",
        help="where run folders (results.json, checkpoint.pt) go; default outputs/benchmarks. A "
        "run interrupted there resumes after its last checkpoint when the command is rerun",
    )
    parser.add_argument("--max-runs", type=int, default=0, help="stop after this many runs")
    parser.add_argument("--list", action="store_true", help="only list the runs still to do")
    parser.add_argument("--quiet", action="store_true", help="no per-round log lines")
    parser.add_argument("--report", action="store_true", help="(re)write docs/BENCHMARKS.md")
    parser.add_argument("--workers", type=int, default=1, help="parallel single-thread processes")
    parser.add_argument("--shard", type=_parse_shard, help="K/N: only this worker's settings")
    args = parser.parse_args()
    threads = os.environ.get("FLUX_BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))
    failures = 0
    if args.protocol and args.workers > 1 and not args.shard and not args.list:
        argv, skip = [], False
        for a in sys.argv[1:]:
            if skip or a.startswith("--workers="):
                skip = False
                continue
            if a == "--workers":
                skip = True
                continue
            argv.append(a)
        failures = run_workers(argv, args.workers)
    elif args.protocol:
        failures = run_grid(args.protocol, args)
    if args.report or not args.protocol:
        from bench_report import write_report  # scripts/bench_report.py

        write_report(PROTOCOLS, PAPER, {p: load_done(p) for p in PROTOCOLS})
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
