"""Sites that bring their own data: the folder contract, a server that needs no dataset, unknown
ground truth, unlabeled sites served, models and predictions delivered, offline routing."""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os

import numpy as np
import pytest
import torch
from PIL import Image

from flux_app.data.folder import DataFolderError, load_folder
from flux_app.engine.config import SHIFTS, RunConfig
from flux_app.engine.delivery import safe_name
from flux_app.engine.results import RunRecorder
from flux_app.engine.server import build_strategy
from flux_app.testing import grid, tamper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exporter():
    spec = importlib.util.spec_from_file_location(
        "export_partitions", os.path.join(ROOT, "scripts", "export_partitions.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """digits in two rotation groups (px level 1): 5 labelled sites and 2 unlabeled-only ones."""
    out = tmp_path_factory.mktemp("sites")
    args = argparse.Namespace(
        out=str(out), dataset="digits", data_root="", shift="px", level=1, alpha=0.5, rho=0.2,
        seed=0, nodes=7, holdout=2, unlabeled=True,
    )  # fmt: skip
    _exporter().export(args)
    return out


# the server names a dataset it could not load (offline, no such folder): the model's shape comes
# from the run-config, and nothing on the server may try to open it
SITE_RUN = {
    "strategy": "flux",
    "dataset": "mnist",
    "data-root": "/nonexistent/no-dataset",
    "channels": 3,
    "num-server-rounds": 2,
    "flux-cluster-round": 1,
    "local-epochs": 20,
    "lr": 0.05,
    "momentum": 0.5,
    "eval-every": 2,
    "device": "cpu",
}


def _run(sites, overrides=None, *, folders=None, hooks=None, out=None):
    folders = folders or sorted(str(p) for p in sites.glob("node_*"))
    values = SITE_RUN | {"min-nodes": len(folders)} | dict(overrides or {})
    if out is not None:
        values |= {"output-dir": str(out), "run-name": "site-run"}
    cfg = RunConfig.from_mapping(values)
    recorder = RunRecorder(cfg) if out is not None else None
    strategy = build_strategy(cfg, recorder)
    results = strategy.start(
        grid(cfg, 0, node_configs=[{"data-path": f} for f in folders], hooks=hooks)
    )
    return results, strategy, recorder


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_flux_on_site_folders_clusters_routes_delivers_and_routes_offline(sites, tmp_path):
    from flux_app.route import route_folder

    results, strategy, recorder = _run(sites, out=tmp_path / "out")
    final = results["final"]
    assert final["num_clusters"] == 2 and final["ari"] == pytest.approx(1.0)
    assert final["routing_accuracy"] == 1.0 and final["served_largest"] == []
    assert set(final["holdout_assignment"]) == {"node_5", "node_6"}
    assert final["accuracy_holdout"] is None  # unlabeled: nothing to evaluate
    # every site got its model; the unlabeled ones also their predictions, well above chance
    for name, placed in final["holdout_assignment"].items():
        folder = sites / name / "flux-app" / "site-run"
        with open(sites / name / "labels.csv") as fh:
            truth = {r["file"]: int(r["label"]) for r in csv.DictReader(fh)}
        with open(folder / "predictions.csv") as fh:
            rows = list(csv.DictReader(fh))
        assert {r["file"] for r in rows} == set(truth)
        assert np.mean([int(r["label"]) == truth[r["file"]] for r in rows]) > 0.3
        # offline routing with the saved router: the same cluster and the same predictions
        offline = route_folder(recorder.root, str(sites / name), str(tmp_path / f"{name}.csv"))
        assert offline["cluster"] == placed
        with open(tmp_path / f"{name}.csv") as fh:
            assert list(csv.DictReader(fh)) == rows
    # a labelled site routed offline with 5 labels a class: likelihood scores, and on these
    # input-shifted groups the same cluster as its label-free route
    with_labels = route_folder(recorder.root, str(sites / "node_0"), str(tmp_path / "n0.csv"), 5)
    label_free = route_folder(recorder.root, str(sites / "node_0"), str(tmp_path / "n0.csv"))
    assert len(with_labels["scores"]) == 2 and "distances" in label_free
    assert with_labels["cluster"] == label_free["cluster"]
    assert final["delivered"]["node_0"]["predictions"] == 0
    assert os.path.exists(sites / "node_0" / "flux-app" / "site-run" / "model.pt")
    manifest = recorder.root + "/router/manifest.json"
    assert os.path.exists(manifest)


def test_unknown_ground_truth_gives_null_metrics_and_the_oracle_refuses(sites, tmp_path):
    import shutil

    folders = []
    for name in ("node_0", "node_1", "node_2"):
        dst = tmp_path / name
        shutil.copytree(sites / name, dst, ignore=shutil.ignore_patterns("group.txt", "flux-app"))
        folders.append(str(dst))
    fast = {"strategy": "fedavg", "num-server-rounds": 1, "local-epochs": 1}
    results, _, _ = _run(sites, fast, folders=folders)
    assert results["final"]["ari"] is None and results["final"]["nmi"] is None
    assert results["final"]["accuracy_known"] is not None  # everything else works
    with pytest.raises(ValueError, match="oracle needs every node's ground-truth group"):
        _run(sites, fast | {"strategy": "oracle"}, folders=folders)


def test_methods_that_need_labels_serve_the_unlabeled_site_the_largest_cluster(sites):
    folders = [str(sites / n) for n in ("node_0", "node_1", "node_2", "node_6")]
    results, strategy, _ = _run(
        sites, {"strategy": "ifca", "num-clusters": 2, "num-server-rounds": 1, "local-epochs": 1},
        folders=folders,
    )  # fmt: skip
    assert results["final"]["served_largest"] == ["node_6"]
    assert results["final"]["holdout_assignment"]["node_6"] == strategy.largest_cluster()
    assert results["final"]["delivered"]["node_6"]["predictions"] > 0


def test_a_node_whose_data_disagrees_with_the_run_is_excluded(sites):
    def lie(content):
        info = dict(content.metric_records["info"])
        info["input-shape"] = [1, 28, 28]
        out = type(content)(dict(content.items()))
        out["info"] = type(content.metric_records["info"])(info)
        return out

    folders = [str(sites / n) for n in ("node_0", "node_1", "node_2")]
    results, strategy, _ = _run(
        sites, {"strategy": "fedavg", "num-server-rounds": 1, "local-epochs": 1, "min-nodes": 3},
        folders=folders,
    )  # fmt: skip
    assert not strategy.excluded
    _, strategy, _ = _run(
        sites, {"strategy": "fedavg", "num-server-rounds": 1, "local-epochs": 1},
        folders=folders, hooks={2: tamper("query.info", lie)},
    )  # fmt: skip
    (reason,) = strategy.excluded.values()
    assert "disagrees with the run" in reason
    assert len(strategy.nodes) == 2  # the others train; one node's word shapes nothing


# ------------------------------------------------------------------------------ the folder
def _png(path, size=(28, 28), mode="L", value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 0)).save(path)


def _load(path, **kw):
    return load_folder(str(path), **({"channels": 1, "image_size": 28, "num_classes": 3} | kw))


def test_folder_contract_reads_labels_sizes_and_colours(tmp_path):
    _png(tmp_path / "train" / "0" / "a.png")
    _png(tmp_path / "train" / "1" / "b.jpg", size=(40, 30))  # resized
    _png(tmp_path / "train" / "cat" / "c.png", mode="RGB")  # a class name; converted to grey
    _png(tmp_path / "test" / "2" / "d.png")
    _png(tmp_path / "unlabeled" / "e.png", mode="RGB")
    got = _load(tmp_path, class_names=["dog", "x", "cat"], val_fraction=0.0)
    d = got.data
    assert d.x_train.shape == (3, 1, 28, 28) and d.x_test.shape == (1, 1, 28, 28)
    assert sorted(d.y_train.tolist()) == [0, 1, 2] and d.y_test.tolist() == [2]
    assert got.unlabeled.shape == (1, 1, 28, 28) and got.unlabeled_names == ["e.png"]
    assert d.group == -1  # no group.txt: no ground truth
    rgb = _load(tmp_path, channels=3, class_names=["dog", "x", "cat"])
    assert rgb.data.x_test.shape == (1, 3, 28, 28)
    assert float(rgb.unlabeled[0, 0].mean()) == pytest.approx(128 / 255, abs=1e-3)


def test_bad_folders_give_clear_errors_or_logged_skips(tmp_path, caplog):
    with pytest.raises(DataFolderError, match="is not a folder"):
        _load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFolderError, match="no usable image"):
        _load(tmp_path / "empty")
    bad = tmp_path / "bad"
    _png(bad / "train" / "0" / "ok.png")
    (bad / "train" / "0" / "broken.png").write_bytes(b"not a png at all")
    with caplog.at_level("WARNING", logger="flwr"):
        got = _load(bad)
    assert len(got.skipped) == 1 and "broken.png" in got.skipped[0]
    assert any("broken.png" in r.getMessage() for r in caplog.records)  # one line per file
    assert len(got.data.y_train) + len(got.data.y_test) + len(got.data.y_val) == 1
    only_broken = tmp_path / "only-broken"
    (only_broken / "train" / "1").mkdir(parents=True)
    (only_broken / "train" / "1" / "x.png").write_bytes(b"\x89PNG garbage")
    with pytest.raises(DataFolderError, match="no usable image"):
        _load(only_broken)
    unknown = tmp_path / "unknown"
    _png(unknown / "train" / "zebra" / "a.png")
    with pytest.raises(DataFolderError, match="'zebra' is not a class"):
        _load(unknown)
    out_of_range = tmp_path / "range"
    _png(out_of_range / "train" / "7" / "a.png")
    with pytest.raises(DataFolderError, match="'7' is not a class"):
        _load(out_of_range)  # num_classes=3
    group = tmp_path / "group"
    _png(group / "train" / "0" / "a.png")
    (group / "group.txt").write_text("first\n")
    with pytest.raises(DataFolderError, match="group.txt"):
        _load(group)


def test_a_flwr_datasets_partition_names_the_extra_when_it_is_missing(tmp_path):
    (tmp_path / "dataset_info.json").write_text("{}")
    try:
        import datasets  # noqa: F401
    except ImportError:
        with pytest.raises(DataFolderError, match=r"flux-app\[datasets\]"):
            _load(tmp_path)
    else:
        pytest.skip("the datasets extra is installed here")


def test_corrupt_files_are_counted_in_the_info_reply(tmp_path):
    from flux_app.engine.client import ClientRuntime, handle_info

    site = tmp_path / "site"
    _png(site / "train" / "0" / "ok.png")
    _png(site / "train" / "1" / "ok2.png")
    (site / "train" / "1" / "bad.jpg").write_bytes(b"junk")
    cfg = RunConfig.from_mapping({"dataset": "digits", "shift": "none", "num-classes": 3})
    rt = ClientRuntime.from_context(cfg.to_dict(), {"data-path": str(site)})
    info = handle_info(None, rt).metric_records["info"]
    assert info["num-skipped"] == 1 and info["has-folder"] == 1
    assert info["partition-id"] == -1 and info["group"] == -1


def test_model_shape_from_the_run_config_matches_the_simulated_data():
    from flux_app.data import input_shape, load_source

    for dataset in ("digits", "synthetic"):
        source = load_source(dataset, "", 0)
        for shift in SHIFTS:  # the run-config's list, checked against the protocols' below
            cfg = RunConfig(dataset=dataset, shift=shift)
            assert cfg.model_input == (input_shape(source, shift), source.num_classes)
    cfg = RunConfig.from_mapping({"image-size": 64, "channels": 1, "class-names": "a,b,c,d"})
    assert cfg.model_input == ((1, 64, 64), 4)
    from flux_app.data import SHIFTS as PROTOCOL_SHIFTS

    assert SHIFTS == PROTOCOL_SHIFTS  # the server's light copy names every protocol


def test_run_names_cannot_escape_a_sites_folder():
    assert safe_name("deploy-2026_12.3") == "deploy-2026_12.3"
    for bad in ("..", "../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            safe_name(bad)


def test_a_flwr_datasets_partition_is_read_through_the_datasets_api(tmp_path, monkeypatch):
    """The reader's side of a save_to_disk partition, against a stand-in for the ``datasets``
    API (load_from_disk -> DatasetDict of rows with a PIL ``image`` and a ``label``)."""
    import sys
    import types

    class Dataset(list):
        column_names = ("image", "label")

    class DatasetDict(dict):
        pass

    rows = [{"image": Image.new("L", (32, 32), 10 * i), "label": i % 3} for i in range(10)]
    rows.append({"image": Image.new("L", (32, 32)), "label": 99})  # out of range: skipped
    parts = DatasetDict(train=Dataset(rows), test=Dataset(rows[:4]))
    stub = types.SimpleNamespace(
        load_from_disk=lambda path: parts, DatasetDict=DatasetDict, Dataset=Dataset
    )
    monkeypatch.setitem(sys.modules, "datasets", stub)
    (tmp_path / "dataset_dict.json").write_text("{}")
    got = _load(tmp_path, val_fraction=0.0)
    assert got.data.x_train.shape == (10, 1, 28, 28)  # resized to the run's shape
    assert got.data.x_test.shape == (4, 1, 28, 28)
    assert sorted(got.data.y_train.tolist()) == sorted(r["label"] for r in rows[:10])
    assert got.skipped == ["train[10]"]
