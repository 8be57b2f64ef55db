"""Run-config: defaults match pyproject.toml, coercion, clear errors."""

from __future__ import annotations

import os

import pytest
import tomllib

from flux_app.engine.config import DATASET_PROFILES, ConfigError, RunConfig
from flux_app.methods.flux.config import FluxConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pyproject_config() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


def test_defaults_match_pyproject_exactly():
    declared = _pyproject_config()
    assert RunConfig().to_dict() == declared
    assert RunConfig.from_mapping(declared) == RunConfig()


def test_contract_keys_present():
    keys = set(_pyproject_config())
    contract = {
        "strategy",
        "dataset",
        "data-root",
        "shift",
        "level",
        "alpha",
        "holdout-clients",
        "num-server-rounds",
        "local-epochs",
        "lr",
        "momentum",
        "batch-size",
        "fraction-train",
        "model",
        "seed",
        "device",
        "output-dir",
    }
    assert contract <= keys


def test_no_federations_block_in_pyproject():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        assert "federations" not in tomllib.load(fh)["tool"]["flwr"]


def test_auto_values_follow_dataset():
    cfg = RunConfig(dataset="fmnist")
    assert cfg.learning_rate == DATASET_PROFILES["fmnist"]["lr"]
    assert cfg.epochs == DATASET_PROFILES["fmnist"]["local_epochs"]
    assert cfg.model_name == "lenet5"
    assert cfg.sgd_momentum == 0.9  # FLUX's protocol
    assert RunConfig(dataset="digits").sgd_momentum == 0.5
    cfg = RunConfig.from_mapping({"lr": 0.1, "local-epochs": 3, "model": "cnn", "momentum": 0.3})
    assert (cfg.learning_rate, cfg.epochs, cfg.model_name) == (0.1, 3, "cnn")
    assert cfg.sgd_momentum == 0.3
    with pytest.raises(ConfigError, match="momentum"):
        RunConfig.from_mapping({"momentum": -0.1})
    with pytest.raises(ConfigError, match="momentum"):
        RunConfig.from_mapping({"momentum": "fast"})


def test_coercion_and_errors():
    cfg = RunConfig.from_mapping({"level": 3.0, "flux-iid-guard": "false", "lr": "0.01"})
    assert cfg.level == 3 and cfg.learning_rate == 0.01
    assert cfg.section(FluxConfig).iid_guard is False
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_mapping({"strategy": "fedprox"})
    with pytest.raises(ConfigError, match="level"):
        RunConfig.from_mapping({"level": 9})
    with pytest.raises(ConfigError, match="unknown run-config key 'levle'"):
        RunConfig.from_mapping({"levle": 3})
    with pytest.raises(ConfigError, match="level"):
        RunConfig.from_mapping({"level": 2.5})
    with pytest.raises(ConfigError, match="flux-dp-noise"):
        RunConfig.from_mapping({"flux-dp-noise": 1.0})


def test_relative_output_dir_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FLUX_APP_OUTPUT_DIR", raising=False)
    assert RunConfig(output_dir="out").resolved_output_dir == str(tmp_path / "out")
    assert RunConfig().resolved_output_dir == str(tmp_path / "outputs")


def test_conf_files_are_valid_and_match_the_benchmark_protocols():
    import glob
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "benchmark", os.path.join(ROOT, "scripts", "benchmark.py")
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    files = sorted(glob.glob(os.path.join(ROOT, "conf", "*.toml")))
    assert len(files) >= 15
    for path in files:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
        RunConfig.from_mapping(values)  # every key known, every value valid
        protocol = "flux-fmnist" if "flux-fmnist" in path else "feddag-fmnist"
        for key, value in bench.PROTOCOLS[protocol]["config"].items():
            assert values[key] == value, (path, key)


def test_every_key_is_documented():
    with open(os.path.join(ROOT, "docs", "CONFIG.md")) as fh:
        doc = fh.read()
    missing = [k for k in _pyproject_config() if f"| `{k}` |" not in doc]
    assert not missing, f"keys missing from docs/CONFIG.md: {missing}"


@pytest.mark.parametrize(
    "bad",
    [
        {"run-name": ".."},
        {"run-name": "../elsewhere"},
        {"run-name": "a/b"},
        {"flux-proj-dim": -5},
        {"lr": "inf"},
        {"momentum": "nan"},
        {"feddag-warmup-rounds": -2},
        {"feddag-subspace-dim": 0},
        {"feddag-top-k": -1},
        {"cfl-eps2": -1.0},
        {"pacfl-subspace-dim": 1000},
        {"num-classes": 1},
        {"channels": 2},
        {"class-names": "a,a"},
    ],
)
def test_values_that_would_run_wrong_are_rejected_at_the_start(bad):
    key = next(iter(bad))
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping(bad)


def test_a_node_picks_its_own_device():
    """node-config ``device`` overrides the run's for that node (a CPU site in a run that asks
    for CUDA trains on its CPU); a bad value is the same clear error as in the run-config."""
    import torch

    from flux_app.engine.client import ClientRuntime

    node = {"partition-id": 0, "num-partitions": 2}
    rt = ClientRuntime.from_context({"device": "cuda"}, node | {"device": "cpu"})
    assert rt.device == torch.device("cpu")
    assert ClientRuntime.from_context({}, node).cfg.device == "auto"
    with pytest.raises(ConfigError, match="device"):
        ClientRuntime.from_context({}, node | {"device": "tpu"})


def test_deterministic_mode_follows_the_run():
    import torch

    from flux_app import testing
    from flux_app.engine.client import ClientRuntime

    node = {"partition-id": 0, "num-partitions": 2}
    try:
        ClientRuntime.from_context({"deterministic": True}, node)
        assert torch.are_deterministic_algorithms_enabled()
        assert not torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic
        assert os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        ClientRuntime.from_context({}, node)
        assert not torch.are_deterministic_algorithms_enabled()
        # on CPU the deterministic kernels are the default ones: the same run, bit for bit
        base = {"strategy": "flux", "dataset": "synthetic", "num-server-rounds": 2}
        a, _ = testing.run(base, 4)
        b, _ = testing.run(base | {"deterministic": True}, 4)
        assert testing.comparable(a)["rounds"] == testing.comparable(b)["rounds"]
        assert a["final"]["accuracy_by_client"] == b["final"]["accuracy_by_client"]
    finally:
        ClientRuntime.from_context({}, node)
