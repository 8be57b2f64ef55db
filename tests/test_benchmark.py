"""The benchmark harness: grid expansion, resume, report."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name: str):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(**kw) -> argparse.Namespace:
    base = dict(
        strategys=None,
        shifts=None,
        levels=None,
        settings=None,
        seeds=None,
        rounds=None,
        device="cpu",
        max_runs=0,
        list=False,
        quiet=True,
        shard=None,
        runs_dir=None,
    )
    return argparse.Namespace(**(base | kw))


def test_grid_filters_and_order():
    bench = _load("benchmark")
    cells = list(bench.cells("flux-fmnist", _args(shifts="px,py", levels="1", seeds="0")))
    methods = bench.PROTOCOLS["flux-fmnist"]["grid"]["strategy"]
    assert len(cells) == 2 * 1 * 1 * len(methods)
    assert [c["strategy"] for c in cells[: len(methods)]] == methods  # side by side
    cfg = bench.run_config(
        "feddag-fmnist", {"setting": "dist2", "strategy": "feddag*", "seed": 0}, None
    )
    assert cfg["shift"] == "concept" and cfg["feddag-variant"] == "single"


def test_resume_skips_finished_runs(tmp_path, monkeypatch):
    bench = _load("benchmark")
    monkeypatch.setattr(bench, "RESULTS_DIR", str(tmp_path))
    monkeypatch.setattr(bench, "ROOT", str(tmp_path))
    bench.PROTOCOLS["tiny"] = {
        "title": "tiny",
        "nodes": 3,
        "config": {"dataset": "synthetic", "num-server-rounds": 1, "local-epochs": 1, "lr": 0.05},
        "grid": {"strategy": ["fedavg", "local"], "shift": ["none"], "seed": [0]},
    }
    try:
        assert bench.run_grid("tiny", _args()) == 0
        with open(bench.results_file("tiny")) as fh:
            rows = [json.loads(line) for line in fh]
        assert [r["cell"]["strategy"] for r in rows] == ["fedavg", "local"]
        assert all(r["final"]["accuracy_known"] is not None for r in rows)
        # A second call finds nothing to do and appends nothing.
        assert bench.run_grid("tiny", _args()) == 0
        with open(bench.results_file("tiny")) as fh:
            assert len(fh.readlines()) == 2
    finally:
        del bench.PROTOCOLS["tiny"]


def test_shards_split_settings_and_keep_methods_together(tmp_path, monkeypatch, capsys):
    bench = _load("benchmark")
    monkeypatch.setattr(bench, "RESULTS_DIR", str(tmp_path))
    grid = dict(shifts="px,py,pyx", levels="1,8", seeds="0", list=True)
    seen = []
    for k in range(3):
        capsys.readouterr()
        assert bench.run_grid("flux-fmnist", _args(**grid, shard=(k, 3))) == 0
        lines = capsys.readouterr().out.splitlines()[1:]
        seen.append([json.loads(line) for line in lines])
    settings = [{(c["shift"], c["level"]) for c in cells} for cells in seen]
    assert [len(s) for s in settings] == [2, 2, 2]  # dealt evenly
    assert set.union(*settings) == {(s, lv) for s in ("px", "py", "pyx") for lv in (1, 8)}
    assert not settings[0] & settings[1] and not settings[1] & settings[2]
    for cells in seen:  # every method of a setting in the same worker, back to back
        methods = len(bench.PROTOCOLS["flux-fmnist"]["grid"]["strategy"])
        assert len(cells) == methods * len({(c["shift"], c["level"]) for c in cells})
    assert bench._parse_shard("2/3") == (1, 3)
    with pytest.raises(argparse.ArgumentTypeError):
        bench._parse_shard("4/3")


def test_report_from_rows(tmp_path, monkeypatch):
    report = _load("bench_report")
    bench = _load("benchmark")
    monkeypatch.setattr(report, "DOC", str(tmp_path / "B.md"))
    monkeypatch.setattr(report, "PLOTS", str(tmp_path))
    cfg = bench.run_config(
        "flux-fmnist", {"shift": "px", "level": 1, "seed": 0, "strategy": "flux"}, None
    )

    def row(strategy, acc, wall, seed=0):
        final = {
            "accuracy_known": acc,
            "accuracy_routed": acc - 0.01,
            "accuracy_holdout": acc - 0.02,
            "num_clusters": 2,
            "ari": 1.0,
            "wall_seconds": wall,
        }
        cell = {"shift": "px", "level": 1, "seed": seed, "strategy": strategy}
        return {
            "key": json.dumps(cell),
            "cell": cell,
            "run_config": cfg,
            "final": final,
            "machine": "test",
            "finished_at": "2026-12-07T08:00:00Z",
        }

    runs = [row("flux", 0.9, 11.0), row("fedavg", 0.7, 10.0), row("ifca", 0.8, 12.0)]
    # a second seed that only one peer has: the every-method table must not average it in
    runs += [row("pacfl", 0.6, 12.0), row("pacfl", 0.2, 12.0, seed=1)]
    done = {
        "flux-fmnist": {r["key"]: r for r in runs},
        "feddag-fmnist": {},
    }
    times = {
        "command": "python scripts/wall_ratio.py --strategies ifca,fedavg",
        "setting": {"shift": "py", "level": 4, "seed": 0, "strategies": ["ifca", "fedavg"]},
        "wall_seconds": {"ifca": [30.0], "fedavg": [10.0]},
        "cpu_seconds": {"ifca": [20.0], "fedavg": [8.0]},
        "wall_ratio_to_reference": {"ifca": 3.0, "fedavg": 1.0},
        "cpu_ratio_to_reference": {"ifca": 2.5, "fedavg": 1.0},
        "machine": "test",
    }
    times["setting"]["b"] = "fedavg"
    (tmp_path / "method-times.json").write_text(json.dumps(times))
    report.write_report(bench.PROTOCOLS, bench.PAPER, done)
    text = (tmp_path / "B.md").read_text()
    assert "| px | 1 | 90.0 | 89.0 | 88.0 | 70.0 |" in text
    assert "| ifca | 30 | 20 | 3.00 | 2.50 |" in text
    assert (tmp_path / "method-times.png").exists()
    assert "median 1.10x" in text and "over 1 pairs" in text
    # a FLUX row rerun in another sitting is not paired with FedAvg's for the wall ratio
    later = dict(runs[0], finished_at="2026-12-08T08:00:00Z")
    report.write_report(
        bench.PROTOCOLS,
        bench.PAPER,
        {**done, "flux-fmnist": {**done["flux-fmnist"], later["key"]: later}},
    )
    assert "median 1.10x" not in (tmp_path / "B.md").read_text()
    report.write_report(bench.PROTOCOLS, bench.PAPER, done)
    text = (tmp_path / "B.md").read_text()
    # the every-method table: only the methods that ran, seed-matched to the peer's seed
    assert (
        "| shift | level | FLUX test phase | FLUX known | FedAvg | PACFL | IFCA | seeds |" in text
    )
    assert "| px | 1 | 89.0 | 90.0 | 70.0 | 60.0 | 80.0 | 0 |" in text
    # and the same for the held-out clients
    assert "| shift | level | FLUX (label-free) | FedAvg | PACFL | IFCA | seeds |" in text
    assert "| px | 1 | 88.0 | 68.0 | 58.0 | 78.0 | 0 |" in text
    assert (tmp_path / "flux-fmnist.png").exists()
    assert (tmp_path / "flux-fmnist-peers.png").exists()


def _tiny_protocol(bench, shift: str, level: int) -> dict:
    return {
        "title": "tiny",
        "nodes": 8,
        "config": {"dataset": "synthetic", "holdout-clients": 2, "val-fraction": 0.0},
        "k-from-groups": True,
        "grid": {"strategy": ["pacfl"], "shift": [shift], "level": [level], "seed": [0]},
    }


def test_k_from_groups_counts_planted_groups_of_training_clients():
    bench = _load("benchmark")
    from flux_app.data import load_source, partition_groups
    from flux_app.engine.client import shift_spec
    from flux_app.engine.config import RunConfig

    for shift, level in (("none", 1), ("px", 4), ("py", 8)):
        bench.PROTOCOLS["tiny"] = _tiny_protocol(bench, shift, level)
        try:
            cell = {"shift": shift, "level": level, "seed": 0, "strategy": "ifca"}
            k = bench.run_config("tiny", cell, None)["num-clusters"]
        finally:
            del bench.PROTOCOLS["tiny"]
        rc = RunConfig.from_mapping({"dataset": "synthetic", "shift": shift, "level": level})
        groups = partition_groups(load_source("synthetic", "", 0), shift_spec(rc), 8)
        assert k == len(set(groups[:6].tolist()))  # held-out clients' groups do not count
        if shift == "none":
            assert k == 1
        else:
            assert k >= 2


def test_pacfl_pilot_threshold_recovers_planted_rotations(monkeypatch, capsys):
    pilot = _load("pacfl_threshold")
    bench = sys.modules["benchmark"]  # the harness module the pilot imported
    bench.PROTOCOLS["tiny"] = _tiny_protocol(bench, "px", 4)
    try:
        monkeypatch.setattr(sys, "argv", ["pacfl_threshold.py", "tiny", "--seed", "1"])
        assert pilot.main() == 0
    finally:
        del bench.PROTOCOLS["tiny"]
    out = capsys.readouterr().out
    assert "'best_ari': 1.0" in out
    chosen = float(out.strip().splitlines()[-1].split("chosen ")[1])
    assert "mean ARI 1.000" in out and 0 < chosen < 45


def test_wall_ratio_times_every_method_against_the_last(tmp_path, monkeypatch):
    timing = _load("wall_ratio")
    out = tmp_path / "times.json"
    argv = "wall_ratio.py --protocol digits-px --shift px --level 2 --rounds 1 --repeats 1"
    monkeypatch.setattr(sys, "argv", argv.split() + ["--strategies", "local,oracle,fedavg"])
    monkeypatch.setattr(sys, "argv", sys.argv + ["--output", str(out)])
    assert timing.main() == 0
    got = json.loads(out.read_text())
    assert got["setting"]["strategies"] == ["local", "oracle", "fedavg"]
    assert got["setting"]["b"] == "fedavg"
    for kind in ("wall", "cpu"):
        secs = got[f"{kind}_seconds"]
        assert all(len(secs[m]) == 1 and secs[m][0] > 0 for m in ("local", "oracle", "fedavg"))
        ratios = got[f"{kind}_ratio_to_reference"]
        assert ratios["fedavg"] == 1.0
        assert ratios["oracle"] == pytest.approx(secs["oracle"][0] / secs["fedavg"][0])
    assert got["wall_ratio"] == got["wall_ratio_to_reference"]["local"]


def test_scale_protocol_sets_nodes_and_keeps_a_clients_sgd_steps():
    bench = _load("benchmark")
    base = bench.PROTOCOLS["flux-fmnist"]["config"]
    for clients, epochs in ((25, 5), (50, 10), (100, 20)):
        cell = {"clients": clients, "shift": "px", "level": 4, "seed": 0, "strategy": "fedavg"}
        cfg = bench.run_config("flux-fmnist-scale", cell, None)
        assert bench.nodes_of("flux-fmnist-scale", cell) == clients + base["holdout-clients"]
        assert cfg["local-epochs"] == epochs == base["local-epochs"] * clients // 10
        # 10 clients train a round: the 10-client protocol's work per round at every size
        assert round(cfg["fraction-train"] * clients) == 10
        assert "clients" not in cfg  # an axis, not a run-config key
    plain = {"shift": "px", "level": 4, "seed": 0, "strategy": "fedavg"}
    assert bench.nodes_of("flux-fmnist", plain) == 12
    assert bench.run_config("flux-fmnist", plain, None)["local-epochs"] == base["local-epochs"]
    assert "fraction-train" not in bench.run_config("flux-fmnist", plain, None)


def test_an_interrupted_long_run_resumes_with_the_same_numbers(tmp_path, monkeypatch):
    """``--rounds R`` other than the protocol's goes to its own results file; a run killed
    part-way resumes after its checkpoint and ends with the uninterrupted run's numbers; a
    checkpoint of another run-config is not resumed."""
    from client_app import app as client_app
    from flux_app import testing
    from flux_app.engine.config import RunConfig
    from flux_app.engine.server import run_server

    bench = _load("benchmark")
    monkeypatch.setattr(bench, "RESULTS_DIR", str(tmp_path))
    testing.set_task_identity()
    bench.PROTOCOLS["tiny"] = {
        "title": "tiny",
        "nodes": 3,
        "config": {"dataset": "synthetic", "num-server-rounds": 1, "local-epochs": 1, "lr": 0.05},
        "grid": {"strategy": ["fedavg"], "shift": ["label-skew"], "seed": [0]},
    }
    cell = {"shift": "label-skew", "seed": 0, "strategy": "fedavg"}
    try:
        assert bench.results_file("tiny", 4).endswith("tiny-r4.jsonl")
        assert bench.results_file("tiny", 1) == bench.results_file("tiny")  # its own budget
        # The uninterrupted run, in one folder ...
        assert bench.run_grid("tiny", _args(rounds=4, runs_dir=str(tmp_path / "a"))) == 0
        with open(bench.results_file("tiny", 4)) as fh:
            whole = json.loads(fh.read())
        assert whole["resumed_after_round"] == 0 and len(whole["accuracy_by_round"]) == 4
        os.remove(bench.results_file("tiny", 4))
        # ... and one killed after round 2 (its checkpoint is what the killed sitting leaves)
        cfg = bench.run_config("tiny", cell, 4, str(tmp_path / "b"))
        killed = testing._KillingGrid(client_app, cfg, 3)
        killed.kill_round = 3
        with pytest.raises(testing.ServerKilled):
            run_server(killed, RunConfig.from_mapping(cfg))
        assert bench.resume_point(cfg) == 2
        other = dict(cfg, lr=0.5)  # another experiment in the same folder: start over
        assert bench.resume_point(other) == 0
        assert bench.run_grid("tiny", _args(rounds=4, runs_dir=str(tmp_path / "b"))) == 0
        with open(bench.results_file("tiny", 4)) as fh:
            resumed = json.loads(fh.read())
        assert resumed["resumed_after_round"] == 2
        assert resumed["accuracy_by_round"] == whole["accuracy_by_round"]
        assert resumed["final"]["accuracy_by_client"] == whole["final"]["accuracy_by_client"]
        assert bench.resume_point(cfg) == 0  # finished: nothing to resume
    finally:
        del bench.PROTOCOLS["tiny"]
