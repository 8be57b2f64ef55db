"""Few-label routing (routing-labels=k): labelled samples, validation, the likelihood rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flux_app.engine.config import ConfigError, RunConfig
from flux_app.methods.flux.clustering import FluxClustering, cluster_descriptors, route_many
from flux_app.methods.flux.descriptors import DescriptorError, MomentAccumulator
from flux_app.methods.flux.fewshot import (
    ClassSample,
    class_neg2_log_likelihood,
    route_with_labels,
    select_labelled,
)

K = C = 6


def test_select_labelled_is_stratified_seeded_and_nested():
    y = torch.tensor([0] * 50 + [1] * 3 + [2] * 20)
    five = select_labelled(y, 5, seed=3)
    assert torch.bincount(y[five], minlength=3).tolist() == [5, 3, 5]
    assert torch.equal(five, select_labelled(y, 5, seed=3))
    assert not torch.equal(five, select_labelled(y, 5, seed=4))
    twenty = select_labelled(y, 20, seed=3)
    assert set(five.tolist()) <= set(twenty.tolist())  # more labels extend the same draw
    assert len(select_labelled(y, 0, seed=3)) == 0
    with pytest.raises(ValueError):
        select_labelled(y, -1, seed=3)


def test_class_sample_validation_rejects_bad_replies():
    good = ClassSample(np.ones((C, K)), np.ones((C, K)), np.full(C, 3)).to_arrays()
    assert ClassSample.from_arrays(good, C, K, 5).counts.tolist() == [3] * C
    bad = [
        {**good, "extra": np.zeros(1)},
        {**good, "class_counts": np.full(C, 6)},  # more than the k asked for
        {**good, "class_counts": np.full(C, -1)},
        {**good, "class_mu": np.full((C, K), np.nan, dtype=np.float32)},
        {**good, "class_sigma": -np.ones((C, K), dtype=np.float32)},
        {**good, "class_mu": np.ones((C, K + 1), dtype=np.float32)},
        {**good, "class_counts": np.ones(C, dtype=np.float32)},
    ]
    for arrays in bad:
        with pytest.raises(DescriptorError):
            ClassSample.from_arrays(arrays, C, K, 5)
    # one sample per class: a mean, no std
    one = ClassSample(np.ones((C, K)), np.ones((C, K)), np.ones(C))
    assert np.all(one.class_sigma == 0) and np.all(one.class_mu == 1)


def test_log_likelihood_matches_the_gaussian_density_of_the_samples():
    rng = np.random.default_rng(0)
    mean = rng.normal(size=(2, C, K))
    std = rng.uniform(0.5, 2, size=(2, C, K))
    x = rng.normal(size=(C, 4, K))  # 4 samples of each class
    acc = MomentAccumulator(C, K)
    acc.update(torch.from_numpy(x.reshape(-1, K)), torch.arange(C).repeat_interleave(4))
    sample = ClassSample(
        acc.class_mean.numpy(),
        MomentAccumulator._std(acc.class_count, acc.class_m2).numpy(),
        acc.class_count.numpy(),
    )
    got = class_neg2_log_likelihood(sample, mean, std)
    want = [
        np.sum((x - mean[z][:, None]) ** 2 / std[z][:, None] ** 2 + np.log(std[z][:, None] ** 2))
        for z in range(2)
    ]
    np.testing.assert_allclose(got, want, rtol=1e-9)


def _permuted_federation(seed, k_labels):
    """Two groups with the SAME inputs and permuted labels (a pyx shift), 5 clients each;
    returns the clustering, and routed clients' label-free descriptors, labelled samples and
    true groups."""
    rng = np.random.default_rng(seed)
    cm, cs = rng.normal(scale=2.0, size=(C, K)), rng.uniform(0.5, 1.5, size=(C, K))
    perms = [np.arange(C), np.roll(np.arange(C), 1)]

    def client(g, n):
        x_cls = rng.integers(0, C, size=n)  # the input's "true" class
        z = cm[x_cls] + cs[x_cls] * rng.normal(size=(n, K))
        y = perms[g][x_cls]  # the label this group gives it
        return z, y

    descs, groups = [], []
    for g in (0, 1):
        for _ in range(5):
            z, y = client(g, 800)
            acc = MomentAccumulator(C, K)
            acc.update(torch.from_numpy(z), torch.from_numpy(y))
            descs.append(acc.finalize())
            groups.append(g)
    clustering = cluster_descriptors(descs)
    lf, samples, truth = [], [], []
    for g in (0, 1):
        for _ in range(10):
            z, y = client(g, 300)
            acc = MomentAccumulator(C, K)
            acc.update(torch.from_numpy(z))
            lf.append(acc.finalize(label_free=True))
            idx = select_labelled(torch.from_numpy(y), k_labels, seed=int(rng.integers(1 << 30)))
            part = MomentAccumulator(C, K)
            part.update(torch.from_numpy(z[idx.numpy()]), torch.from_numpy(y[idx.numpy()]))
            samples.append(
                ClassSample(
                    part.class_mean.numpy(),
                    MomentAccumulator._std(part.class_count, part.class_m2).numpy(),
                    part.class_count.numpy(),
                )
            )
            truth.append(g)
    return clustering, np.array(groups), lf, samples, np.array(truth)


@pytest.mark.parametrize("k", [1, 5])
def test_labels_separate_a_label_permutation_that_inputs_cannot(k):
    clustering, groups, lf, samples, truth = _permuted_federation(0, k)
    assert clustering.num_clusters == 2  # the class-conditional blocks see the permutation
    cluster_of_group = {
        g: int(np.bincount(clustering.labels[groups == g]).argmax()) for g in (0, 1)
    }
    want = np.array([cluster_of_group[g] for g in truth])
    label_free, _ = route_many(lf, clustering)
    with_labels, scores = route_with_labels(lf, samples, clustering)
    assert scores.shape == (len(lf), 2)
    assert np.mean(with_labels == want) == 1.0
    assert np.mean(label_free == want) < 0.8  # label-free routing is near a coin flip here


def test_with_equal_block_variances_and_no_labels_the_rule_is_label_free_routing():
    clustering, _, lf, samples, _ = _permuted_federation(1, 5)
    empty = [ClassSample(s.class_mu, s.class_sigma, np.zeros(C)) for s in samples]
    same = FluxClustering(**{**clustering.__dict__, "routing_scatter": np.ones(2)})
    got, _ = route_with_labels(lf, empty, same)
    want, _ = route_many(lf, same)
    np.testing.assert_array_equal(got, want)


def test_routing_labels_config():
    assert RunConfig.from_mapping({"routing-labels": 5}).routing_labels == 5
    with pytest.raises(ConfigError, match="routing-labels"):
        RunConfig.from_mapping({"routing-labels": -1})
    with pytest.raises(ConfigError, match="flux-routing-labels-sweep"):
        RunConfig.from_mapping({"strategy": "flux", "flux-routing-labels-sweep": "1,x"})
    with pytest.raises(ConfigError, match="flux-routing-labels-sweep"):
        RunConfig.from_mapping(
            {"flux-routing-labels-sweep": "5", "flux-dp-clip": 1.0, "flux-dp-noise": 1.0}
        )


def test_routing_labels_run_end_to_end(small_run):
    from flux_app.testing import run

    cfg = small_run | {
        "strategy": "flux",
        "flux-cluster-round": 1,
        "holdout-clients": 2,
        "routing-labels": 3,
        "flux-routing-labels-sweep": "0,2",
    }
    results, strategy = run(cfg, 8)
    final = results["final"]
    for key in ("accuracy_routed_k0", "accuracy_routed_k2", "accuracy_holdout_k2"):
        assert isinstance(final[key], float), key
    # k = 0 in the sweep is label-free routing: the same as a run without labels routes
    assert final["accuracy_routed_k0"] is not None
    releases = strategy.descriptor_releases
    assert all(r.get("few_labels", 0) >= 1 for name, r in releases.items())
    with pytest.raises(ConfigError, match="routing-labels"):
        run(cfg | {"flux-dp-clip": 1.0, "flux-dp-noise": 1.0, "flux-routing-labels-sweep": ""}, 4)


def test_descriptor_layer_conv_reads_the_400d_conv_stack(small_run):
    from flux_app.common.models import build_model
    from flux_app.methods.flux.descriptors import descriptor_features
    from flux_app.testing import run

    model = build_model("lenet5", (1, 28, 28), 10)
    conv, width = descriptor_features(model, "conv")
    assert width == 400
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(conv(x), model.encoder[0](x))  # the layer before the FC layers
    head, width = descriptor_features(model)
    assert width == 84 and torch.equal(head(x), model.features(x))
    with pytest.raises(ValueError, match="conv stack"):
        descriptor_features(build_model("resnet9", (3, 32, 32), 10), "conv")
    with pytest.raises(ConfigError, match="flux-descriptor-layer"):
        RunConfig.from_mapping({"flux-descriptor-layer": "fc1"})
    # a run with the conv layer clusters and routes (different descriptors, same protocol)
    cfg = small_run | {"strategy": "flux", "flux-cluster-round": 1, "holdout-clients": 2}
    conv_run, _ = run(cfg | {"flux-descriptor-layer": "conv"}, 8)
    head_run, _ = run(cfg, 8)
    assert conv_run["final"]["holdout_assignment"] and conv_run["clustering"]["num_clusters"] >= 1
    assert conv_run["clustering"]["scales"] != head_run["clustering"]["scales"]
