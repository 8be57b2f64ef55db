"""Plug-ins: a method that lives outside the package registers its strategy, its client action
and its own config section, and runs like a built-in one (docs/EXTENDING.md's examples)."""

from __future__ import annotations

import warnings

import pytest

from flux_app.engine.config import ConfigError, RunConfig
from flux_app.engine.registry import QUERIES, STRATEGIES, RegistryError, register_strategy
from flux_app.testing import FAST, run

PLUGINS = "examples.hist_kmeans,examples.flux_ward"
SKEW = FAST | {"shift": "label-skew", "rho": 0.5, "alpha": 100.0, "num-server-rounds": 3}


def test_plugin_registers_strategy_query_and_section_and_runs():
    cfg = RunConfig.from_mapping(
        SKEW
        | {
            "plugins": PLUGINS,
            "strategy": "hist-kmeans",
            "plugin-config": "hist-kmeans-k-max=4",
            "holdout-clients": 2,
        }
    )
    from examples.hist_kmeans import HistKMeansConfig

    assert cfg.section(HistKMeansConfig).k_max == 4
    assert "hist-kmeans" in STRATEGIES and "label_histogram" in QUERIES
    results, strategy = run(cfg, 10)
    final = results["final"]
    # two planted label sets, found with K chosen by silhouette among 2..4
    assert final["num_clusters"] == 2 and final["ari"] == pytest.approx(1.0)
    assert final["routing_accuracy"] == 1.0  # held-out nodes placed by their own histogram
    assert results["clustering"]["k_max"] == 4
    assert strategy.traffic["query.label_histogram"]["up"] > 0  # metrics-free data counted


def test_flux_variant_plugin_changes_only_the_clustering():
    cfg = SKEW | {
        "plugins": PLUGINS,
        "strategy": "flux-ward",
        "num-clusters": 2,
        "flux-cluster-round": 1,
        "holdout-clients": 2,
    }
    results, strategy = run(cfg, 10)
    assert results["final"]["ari"] == pytest.approx(1.0)
    assert strategy.result.method == "ward"
    assert results["final"]["accuracy_routed"] is not None  # FLUX's routing, inherited


def test_plugin_settings_are_validated_by_the_plugin():
    with pytest.raises(ConfigError, match="hist-kmeans-k-max"):
        RunConfig.from_mapping(
            {"plugins": PLUGINS, "strategy": "hist-kmeans", "plugin-config": "hist-kmeans-k-max=1"}
        )
    with pytest.raises(ConfigError, match="unknown run-config key 'hist-kmeans-kmax'"):
        RunConfig.from_mapping({"plugins": PLUGINS, "plugin-config": "hist-kmeans-kmax=3"})
    with pytest.raises(ConfigError, match="not key=value"):
        RunConfig.from_mapping({"plugins": PLUGINS, "plugin-config": "hist-kmeans-k-max"})
    # a plug-in's key without its plug-in is unknown; its strategy is not available
    with pytest.raises(ConfigError, match="strategy"):
        RunConfig.from_mapping({"strategy": "no-such-method"})


def test_missing_or_malformed_plugin_is_a_clear_error():
    with pytest.raises(ConfigError, match="cannot be imported"):
        RunConfig.from_mapping({"plugins": "examples.no_such_plugin"})
    with pytest.raises(ConfigError, match="not a module path"):
        RunConfig.from_mapping({"plugins": "../evil"})


def test_round_trip_of_a_plugin_run_config():
    cfg = RunConfig.from_mapping(
        {"plugins": PLUGINS, "strategy": "hist-kmeans", "plugin-config": "hist-kmeans-k-max=5"}
    )
    again = RunConfig.from_mapping(cfg.to_dict())  # what run_config.json and every node see
    assert again == cfg


def test_names_cannot_be_taken_twice():
    with pytest.raises(RegistryError, match="already registered"):

        @register_strategy("flux")
        class Impostor:  # noqa: B903
            pass


def test_renamed_keys_still_work_with_a_warning():
    from flux_app.methods.flux.config import FluxConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = RunConfig.from_mapping({"cluster-round": 4})
    assert cfg.section(FluxConfig).cluster_round == 4
    assert any("flux-cluster-round" in str(w.message) for w in caught)


def test_a_plugins_section_belongs_only_to_runs_that_name_it():
    RunConfig.from_mapping({"plugins": PLUGINS})  # registers the example's section
    plain = RunConfig.from_mapping({})
    assert not any(k.startswith("hist-kmeans-") for k in plain.to_dict())
    with pytest.raises(ConfigError, match="unknown run-config key 'hist-kmeans-k-max'"):
        RunConfig.from_mapping({"plugin-config": "hist-kmeans-k-max=3"})
