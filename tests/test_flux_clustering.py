"""FLUX server side: W2 embedding, normalisation, clustering without K, IID guard, routing, scale."""

from __future__ import annotations

import math
import time
import tracemalloc

import numpy as np
import pytest
import torch

from flux_app.methods.flux.clustering import (
    BlockNormaliser,
    absent_classes,
    ari_nmi,
    cluster_descriptors,
    descriptor_distance,
    embed,
    knee_point,
    label_free_embed,
    route,
    route_many,
)
from flux_app.methods.flux.descriptors import FluxDescriptor, MomentAccumulator

K = C = 10
METHODS = ["hdbscan", "knee-dbscan"]


# ------------------------------------------------------------------------------------------
# synthetic federations: latents drawn per class, descriptors via the real accumulator
# ------------------------------------------------------------------------------------------
def _world(rng, k=K, c=C):
    return rng.normal(size=(c, k)), rng.uniform(0.5, 1.5, size=(c, k))


def _client(rng, world, n, shift=None, classes=None) -> FluxDescriptor:
    cm, cs = world
    c, k = cm.shape
    pool = np.arange(c) if classes is None else np.asarray(classes)
    y = rng.choice(pool, size=n)
    z = cm[y] + cs[y] * rng.normal(size=(n, k))
    if shift is not None:
        z = z + shift
    acc = MomentAccumulator(c, k)
    acc.update(torch.from_numpy(z), torch.from_numpy(y))
    return acc.finalize()


def _iid(seed):
    rng = np.random.default_rng(seed)
    w = _world(rng)
    m = int(rng.integers(10, 51))
    return [_client(rng, w, int(rng.integers(100, 2001))) for _ in range(m)]


def _planted(seed, groups=4, per_group=5, shift_scale=0.5, n_range=(100, 2001)):
    rng = np.random.default_rng(seed)
    w = _world(rng)
    shifts = rng.normal(size=(groups, K)) * shift_scale
    ds, g = [], []
    for gi in range(groups):
        for _ in range(per_group):
            ds.append(_client(rng, w, int(rng.integers(*n_range)), shift=shifts[gi]))
            g.append(gi)
    return ds, np.array(g), rng, w, shifts


def _exact(mu, sigma, n, cmu=None, csig=None, counts=None) -> FluxDescriptor:
    return FluxDescriptor(np.asarray(mu, float), np.asarray(sigma, float), n, cmu, csig, counts)


# ------------------------------------------------------------------------------------------
# distance = sum of W2^2 between diagonal Gaussians
# ------------------------------------------------------------------------------------------
def _w2sq_diag(m1, s1, m2, s2):
    return float(np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2))


def test_raw_embedding_is_sum_of_w2_exact_moments():
    rng = np.random.default_rng(0)
    k, c = 3, 4
    a = _exact(
        rng.normal(size=k),
        rng.uniform(0.1, 2, k),
        100,
        rng.normal(size=(c, k)),
        rng.uniform(0.1, 2, (c, k)),
        [25] * 4,
    )
    b = _exact(
        rng.normal(size=k),
        rng.uniform(0.1, 2, k),
        100,
        rng.normal(size=(c, k)),
        rng.uniform(0.1, 2, (c, k)),
        [10, 30, 30, 30],
    )
    e = embed([a, b])
    assert e.shape == (2, 2 * k + 2 * c * k + c)
    expected = _w2sq_diag(a.mu, a.sigma, b.mu, b.sigma) + sum(
        _w2sq_diag(a.class_mu[i], a.class_sigma[i], b.class_mu[i], b.class_sigma[i])
        for i in range(c)
    )
    assert math.isclose(float(np.sum((e[0] - e[1]) ** 2)), expected, rel_tol=1e-12)
    assert math.isclose(descriptor_distance(a, b) ** 2, expected, rel_tol=1e-12)
    lf = label_free_embed([a, b])
    assert math.isclose(
        float(np.sum((lf[0] - lf[1]) ** 2)), _w2sq_diag(a.mu, a.sigma, b.mu, b.sigma)
    )


def test_raw_embedding_matches_empirical_w2_on_gaussian_samples():
    # For product measures the 1-D quantile couplings are optimal: W2^2 = sum over dims of the
    # 1-D W2^2, estimated from equal-size samples as mean((sorted x - sorted y)^2).
    rng = np.random.default_rng(1)
    k, c, n_c = 3, 2, 40000

    def sample(means, stds):
        zs = [means[i] + stds[i] * rng.normal(size=(n_c, k)) for i in range(c)]
        return zs, np.concatenate(zs), np.repeat(np.arange(c), n_c)

    def emp_w2(x, y):
        return float(np.sum((np.sort(x, 0) - np.sort(y, 0)) ** 2) / len(x))

    m1, s1 = rng.normal(size=(c, k)), rng.uniform(0.5, 2, (c, k))
    m2, s2 = m1 + rng.normal(size=(c, k)), rng.uniform(0.5, 2, (c, k))
    za, all_a, ya = sample(m1, s1)
    zb, all_b, yb = sample(m2, s2)
    descs = []
    for z, y in ((all_a, ya), (all_b, yb)):
        acc = MomentAccumulator(c, k)
        acc.update(torch.from_numpy(z), torch.from_numpy(y))
        descs.append(acc.finalize())
    e = embed(descs)
    d2 = float(np.sum((e[0] - e[1]) ** 2))
    # Class parts are Gaussian: empirical W2 must agree. (The marginal is a mixture, so compare
    # the embedding's marginal term with its closed form on the moments instead.)
    emp_classes = sum(emp_w2(za[i], zb[i]) for i in range(c))
    cls_part = d2 - _w2sq_diag(descs[0].mu, descs[0].sigma, descs[1].mu, descs[1].sigma)
    assert cls_part == pytest.approx(emp_classes, rel=0.03)
    closed = sum(_w2sq_diag(m1[i], s1[i], m2[i], s2[i]) for i in range(c))
    assert cls_part == pytest.approx(closed, rel=0.03)
    # Single Gaussian marginal: one-class clients.
    x = 1.0 + 0.5 * rng.normal(size=(n_c, k))
    yv = -2.0 + 1.5 * rng.normal(size=(n_c, k))
    lf = []
    for z in (x, yv):
        acc = MomentAccumulator(1, k)
        acc.update(torch.from_numpy(z), torch.zeros(n_c, dtype=torch.long))
        lf.append(acc.finalize().label_free())
    lfe = label_free_embed(lf)
    assert float(np.sum((lfe[0] - lfe[1]) ** 2)) == pytest.approx(emp_w2(x, yv), rel=0.03)


def test_missing_class_penalty_semantics():
    k, c = 2, 3
    ones = np.ones((c, k))
    # 300 samples a client: a class with none is significantly absent (absent_classes)
    a = _exact([0, 0], [1, 1], 300, ones * 0.0, ones, [100, 100, 100])
    b = _exact([0, 0], [1, 1], 300, ones * 0.0, ones, [150, 150, 0])  # class 2 absent
    z = _exact([0, 0], [1, 1], 300, ones * 0.0, ones, [300, 0, 0])  # classes 1, 2 absent
    # Identity fit on the pair: the class mean is the present client's block -> exactly penalty.
    assert descriptor_distance(a, b, missing_penalty=2.5) ** 2 == pytest.approx(2.5)
    # b vs z: class 1 present at b only (penalty), class 2 absent at both (0).
    assert descriptor_distance(b, z, missing_penalty=2.5) ** 2 == pytest.approx(2.5)
    # With a federation mean different from the present client: penalty + deviation.
    other = _exact([0, 0], [1, 1], 300, ones * 0.0 + 2.0, ones, [100, 100, 100])
    nz = BlockNormaliser.fit([a, b, other], scale=False)
    dev = float(np.sum((a.class_mu[2] - nz.class_mu_mean[2]) ** 2))
    assert dev > 0
    assert descriptor_distance(a, b, nz, missing_penalty=2.5) ** 2 == pytest.approx(
        2.5 + dev + float(np.sum((a.class_mu[:2] - b.class_mu[:2]) ** 2))
    )
    e = embed([a, b], nz, missing_penalty=2.5)
    assert float(np.linalg.norm(e[0] - e[1])) == pytest.approx(descriptor_distance(a, b, nz, 2.5))


def test_a_class_missed_by_chance_is_not_an_absence():
    """Few samples: no sample of a class is no evidence that the class is absent. 30 samples at
    a class share of 1/6 miss it with probability 0.03 (> 0.01 / 3): imputed, no penalty. The
    same share at 300 samples: absent (probability 1e-23)."""
    k, c = 2, 3
    ones = np.ones((c, k))
    a = _exact([0, 0], [1, 1], 30, ones * 0.0, ones, [10, 10, 10])
    b = _exact([0, 0], [1, 1], 30, ones * 0.0, ones, [15, 15, 0])
    assert descriptor_distance(a, b, missing_penalty=2.5) == pytest.approx(0.0)
    share = np.array([0.4, 0.5, 0.1])  # no sample at 30 draws: class 1 1e-9, class 2 0.04
    counts = np.array([[15, 15, 0], [150, 150, 0], [29, 0, 1], [10, 10, 10]])
    got = absent_classes(counts, counts.sum(1), share)
    assert got.tolist() == [[False, False, False], [False, False, True], [False, True, False]] + [
        [False] * 3
    ]
    assert absent_classes(counts, counts.sum(1), None).tolist() == (counts < 2).tolist()


def test_clients_missing_one_class_by_chance_stay_in_their_group():
    """1,000 tiny clients (48 samples, 10 classes, 3 groups): a third of them miss some class by
    chance. Counted as absences, these misses formed micro-clusters of the clients missing the
    same class (40 clusters, ARI 0.49 on FMNIST); the groups must come out whole."""
    rng = np.random.default_rng(5)
    k, c, per = 6, 10, 48
    centres = [rng.normal(0, 1.0, size=(c, k)) for _ in range(3)]
    truth = np.repeat(np.arange(3), [340, 330, 330])
    ds = []
    for g in truth:
        y = rng.integers(0, c, size=per)
        x = centres[g][y] + rng.normal(0, 0.7, size=(per, k))
        acc = MomentAccumulator(c, k)
        acc.update(torch.from_numpy(x), torch.from_numpy(y))
        ds.append(acc.finalize())
    assert np.mean([not d.present.all() for d in ds]) > 0.2
    res = cluster_descriptors(ds)
    assert res.num_clusters == 3
    assert ari_nmi(truth, res.labels)[0] == pytest.approx(1.0)


def test_descriptor_distance_equals_embedding_distance_with_normaliser():
    rng = np.random.default_rng(2)
    w = _world(rng, k=4, c=5)
    ds = [
        _client(rng, w, int(rng.integers(20, 200)), classes=rng.choice(5, size=3, replace=False))
        for _ in range(12)
    ]
    assert any(not d.present.all() for d in ds)
    nz = BlockNormaliser.fit(ds)
    e = embed(ds, nz, missing_penalty=0.7)
    for i in range(len(ds)):
        for j in range(len(ds)):
            assert float(np.linalg.norm(e[i] - e[j])) == pytest.approx(
                descriptor_distance(ds[i], ds[j], nz, missing_penalty=0.7), rel=1e-9, abs=1e-12
            )
    np.testing.assert_allclose(label_free_embed(ds, nz), e[:, :8])


# ------------------------------------------------------------------------------------------
# normaliser
# ------------------------------------------------------------------------------------------
def test_normaliser_robust_spread_and_round_trip():
    rng = np.random.default_rng(3)
    mus = rng.normal(size=(30, 3))
    ds = [_exact(m, [1, 1, 1], 10**9) for m in mus]  # huge n: sampling noise ~0
    nz = BlockNormaliser.fit(ds, noise_floor=0.0)
    med = np.median(mus, axis=0)
    assert nz.scale_mu == pytest.approx(float(np.median(np.linalg.norm(mus - med, axis=1))))
    assert nz.scale_sigma == 1.0  # all sigmas identical: fallback, no division by ~0
    # A wild outlier barely moves the robust scale (min-max scaling would explode).
    out = BlockNormaliser.fit([*ds, _exact([1e4, 0, 0], [1, 1, 1], 10**9)], noise_floor=0.0)
    assert out.scale_mu == pytest.approx(nz.scale_mu, rel=0.15)
    back = BlockNormaliser.from_dict(nz.to_dict())
    assert back.scales == nz.scales and back.label_free


def test_normaliser_noise_floor_downweights_noise_only_blocks():
    # Label-shift federation: class-conditional moments are shared -> class blocks are pure noise.
    rng = np.random.default_rng(4)
    w = _world(rng)
    ds = [_client(rng, w, 300, classes=rng.choice(C, size=5, replace=False)) for _ in range(20)]
    plain = BlockNormaliser.fit(ds, noise_floor=0.0)
    floored = BlockNormaliser.fit(ds)  # default floor 3
    assert floored.scale_class_mu > 2.0 * plain.scale_class_mu
    assert floored.scale_mu == pytest.approx(plain.scale_mu)  # real structure: unchanged
    assert floored.class_mu_mean.shape == (C, K) and floored.class_seen.all()


def test_identical_descriptors_scales_fall_back_to_one():
    d = _exact([1, 2], [0, 0], 5, np.ones((2, 2)), np.zeros((2, 2)), [3, 2])
    nz = BlockNormaliser.fit([d, d, d])
    assert all(v == 1.0 for v in nz.scales.values())


# ------------------------------------------------------------------------------------------
# knee detector
# ------------------------------------------------------------------------------------------
def test_knee_point():
    curve = np.concatenate([np.linspace(1.0, 1.2, 40), [3.0, 6.0, 10.0]])
    i = knee_point(curve[::-1])  # unsorted input is sorted
    assert i is not None and 37 <= i <= 40
    assert knee_point(np.linspace(0, 1, 50)) is None  # linear
    assert knee_point(np.ones(20)) is None  # flat
    assert knee_point(np.array([1.0, 5.0])) is None  # too short
    assert knee_point(np.sqrt(np.linspace(0, 1, 50))) is None  # concave: no elbow


# ------------------------------------------------------------------------------------------
# clustering: IID guard, planted groups, label shift
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_iid_clients_stay_one_cluster(method):
    for seed in range(10):
        cl = cluster_descriptors(_iid(seed), method=method)
        assert cl.num_clusters == 1, (seed, cl.notes)
        assert np.all(cl.labels == 0)


def test_without_guard_iid_clients_get_split():
    # The guard is what keeps IID federations whole: density clustering alone splits noise.
    splits = [
        cluster_descriptors(_iid(s), method=m, iid_guard=False).num_clusters
        for s in range(2)
        for m in METHODS
    ]
    assert max(splits) > 1


@pytest.mark.parametrize("method", METHODS)
def test_planted_groups_recovered(method):
    for seed in range(5):
        ds, g, *_ = _planted(100 + seed)
        cl = cluster_descriptors(ds, method=method)
        ari, nmi = ari_nmi(g, cl.labels)
        assert ari >= 0.9, (seed, cl.num_clusters, cl.notes)
        assert nmi >= 0.9


@pytest.mark.parametrize("method", METHODS)
def test_label_shift_groups_separated(method):
    rng = np.random.default_rng(5)
    w = _world(rng)
    subsets = [rng.choice(C, size=6, replace=False) for _ in range(3)]
    ds, g = [], []
    for gi, sub in enumerate(subsets):
        for _ in range(6):
            ds.append(_client(rng, w, int(rng.integers(300, 2001)), classes=sub))
            g.append(gi)
    cl = cluster_descriptors(ds, method=method)
    assert ari_nmi(g, cl.labels)[0] >= 0.9, cl.notes


def test_label_free_only_clustering():
    ds, g, *_ = _planted(7, shift_scale=1.0)
    cl = cluster_descriptors([d.label_free() for d in ds])
    assert ari_nmi(g, cl.labels)[0] >= 0.9
    assert cl.normaliser.label_free and cl.centroids.shape[1] == 2 * K
    with pytest.raises(ValueError, match="mix"):
        cluster_descriptors([ds[0], ds[1].label_free(), ds[2]])


def test_subset_path_matches_groups():
    ds, g, *_ = _planted(8, groups=3, per_group=60, n_range=(200, 1000))
    cl = cluster_descriptors(ds, max_dense=50, seed=3)
    assert any("max_dense" in n for n in cl.notes)
    assert ari_nmi(g, cl.labels)[0] >= 0.9
    np.testing.assert_allclose(cl.centroids[0], embed(ds, cl.normaliser)[cl.labels == 0].mean(0))


# ------------------------------------------------------------------------------------------
# edge cases and noise policies
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_edge_cases_do_not_crash(method):
    rng = np.random.default_rng(9)
    w = _world(rng)
    one = cluster_descriptors([_client(rng, w, 100)], method=method)
    assert one.num_clusters == 1 and one.labels.tolist() == [0]
    same = [_client(rng, w, 500) for _ in range(2)]
    assert cluster_descriptors(same, method=method).num_clusters == 1  # same distribution
    far = [_client(rng, w, 500), _client(rng, w, 500, shift=np.full(K, 3.0))]
    assert cluster_descriptors(far, method=method).num_clusters == 2
    assert cluster_descriptors(far, method=method, iid_guard=False).num_clusters == 1
    d = _client(rng, w, 300)
    ident = cluster_descriptors([d] * 6, method=method)
    assert ident.num_clusters == 1 and any("identical" in n for n in ident.notes)
    dup = cluster_descriptors(
        [d] * 3 + [_client(rng, w, 300, shift=np.full(K, 3.0))] * 3, method=method
    )
    assert dup.num_clusters == 2
    assert dup.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_knee_dbscan_without_knee_falls_back():
    # Points on a line at equal spacing: flat 1-NN curve, no knee; must not crash.
    ds = [_exact([float(i), 0.0], [1.0, 1.0], 10**8) for i in range(8)]
    cl = cluster_descriptors(ds, method="knee-dbscan", iid_guard=False)
    assert any("no knee" in n for n in cl.notes)
    assert cl.num_clusters == 1  # single-linkage at the largest 1-NN gap joins the chain


def test_noise_policies():
    # Two tight groups of 6 and one client far from everything (knee-DBSCAN noise).
    rng = np.random.default_rng(10)
    a = [_exact(rng.normal(0, 0.05, 2), [1, 1], 10**8) for _ in range(6)]
    b = [_exact(rng.normal(0, 0.05, 2) + [10, 0], [1, 1], 10**8) for _ in range(6)]
    lone = _exact([5, 40], [1, 1], 10**8)
    ds = [*a, *b, lone]
    kw = dict(method="knee-dbscan", iid_guard=False)
    sing = cluster_descriptors(ds, noise_policy="singleton", **kw)
    assert sing.num_clusters == 3 and sing.labels[12] == 2
    strict = cluster_descriptors(ds, noise_policy="attach", **kw)
    assert strict.num_clusters == 3  # far beyond 2x the cluster radius: stays alone
    loose = cluster_descriptors(ds, noise_policy="attach", attach_tolerance=1e4, **kw)
    assert loose.num_clusters == 2 and loose.labels[12] in (0, 1)


def test_attach_rule_uses_cluster_radius():
    from flux_app.methods.flux.clustering import _apply_noise_policy

    # cluster 0: centroid (1, 1), radius sqrt 2; cluster 1: tight (radius 0.05), so the global
    # radius (~1.41) is used; noise: 2.7 from centroid 0 (<= 2.83: attached), 3.0 from it
    # (singleton), 2.5 from cluster 1 (attached thanks to the global radius).
    x = np.array(
        [[0.0, 0], [2, 0], [0, 2], [2, 2], [50, 50], [50.1, 50], [1, 3.7], [1, 4.0], [50.05, 52.5]]
    )
    raw = np.array([0, 0, 0, 0, 1, 1, -1, -1, -1])
    notes: list[str] = []
    out = _apply_noise_policy(x, raw, "attach", 2.0, notes)
    assert out.tolist() == [0, 0, 0, 0, 1, 1, 0, 2, 1]
    out = _apply_noise_policy(x, raw, "singleton", 2.0, notes)
    assert out.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 4]
    out = _apply_noise_policy(x, np.full(9, -1), "attach", 2.0, notes)
    assert out.tolist() == [0] * 9 and "one cluster" in notes[-1]


def test_bad_arguments():
    ds = _iid(0)[:5]
    with pytest.raises(ValueError):
        cluster_descriptors(ds, method="kmeans")
    with pytest.raises(ValueError):
        cluster_descriptors(ds, noise_policy="drop")
    with pytest.raises(ValueError):
        cluster_descriptors([])


# ------------------------------------------------------------------------------------------
# routing and metrics
# ------------------------------------------------------------------------------------------
def test_routing_newcomers_by_label_free_part():
    ds, g, rng, w, shifts = _planted(11, shift_scale=0.7)
    cl = cluster_descriptors(ds)
    assert ari_nmi(g, cl.labels)[0] == pytest.approx(1.0)
    group_cluster = {gi: int(np.bincount(cl.labels[g == gi]).argmax()) for gi in range(4)}
    newcomers, truth = [], []
    for gi in range(4):
        for _ in range(5):
            newcomers.append(
                _client(rng, w, int(rng.integers(100, 1000)), shift=shifts[gi]).label_free()
            )
            truth.append(group_cluster[gi])
    routed, dist = route_many(newcomers, cl)
    assert dist.shape == (20, cl.num_clusters)
    np.testing.assert_array_equal(routed, truth)
    c0, d0 = route(newcomers[0], cl)
    assert c0 == routed[0] and np.allclose(d0, dist[0])
    c_full, _ = route(ds[0], cl)  # a full descriptor routes by its label-free part
    assert c_full == cl.labels[0]


def test_ari_nmi():
    assert ari_nmi([0, 0, 1, 1], [5, 5, 2, 2]) == (pytest.approx(1.0), pytest.approx(1.0))
    ari, _ = ari_nmi([0, 0, 1, 1], [0, 1, 0, 1])
    assert ari < 0.1


# ------------------------------------------------------------------------------------------
# scale: 100k clients, no n x n matrix
# ------------------------------------------------------------------------------------------
def test_100k_clients_cluster_without_quadratic_memory():
    rng = np.random.default_rng(12)
    n, groups = 100_000, 8
    gm, gs = rng.normal(size=(groups, K)), rng.uniform(0.5, 1.5, (groups, K))
    gcm, gcs = rng.normal(size=(groups, C, K)), rng.uniform(0.5, 1.5, (groups, C, K))
    g = rng.integers(0, groups, size=n)
    ns = rng.integers(100, 2000, size=n)
    counts = np.stack([rng.multinomial(int(k), np.full(C, 1 / C)) for k in ns])
    mu = gm[g] + gs[g] * rng.normal(size=(n, K)) / np.sqrt(ns)[:, None]
    sg = gs[g] * (1 + rng.normal(size=(n, K)) / np.sqrt(2 * ns)[:, None])
    cmu = gcm[g] + gcs[g] * rng.normal(size=(n, C, K)) / np.sqrt(counts)[:, :, None]
    csg = gcs[g] * (1 + rng.normal(size=(n, C, K)) / np.sqrt(2 * counts)[:, :, None])
    ds = [FluxDescriptor(mu[i], sg[i], int(ns[i]), cmu[i], csg[i], counts[i]) for i in range(n)]
    del mu, sg, cmu, csg
    tracemalloc.start()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        cl = cluster_descriptors(ds)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"100k clients: wall {wall:.1f} s, cpu {cpu:.1f} s, peak {peak / 2**20:.0f} MiB")
    assert peak < 2 * 2**30  # n*n*8 bytes would be 80 GB
    assert wall < 60
    assert cl.labels.shape == (n,)
    assert ari_nmi(g, cl.labels)[0] >= 0.99
