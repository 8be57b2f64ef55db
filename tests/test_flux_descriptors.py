"""FLUX descriptors: projection, streaming moments, wire format validation, privacy noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flux_app.methods.flux.descriptors import (
    DescriptorError,
    FluxDescriptor,
    MomentAccumulator,
    compute_flux_descriptor,
    descriptor_keys,
    privatize,
    projection_matrix,
)


def _reference_moments(z: np.ndarray, y: np.ndarray, c: int):
    mu, sigma = z.mean(0), z.std(0, ddof=1)
    cmu, csig, cnt = np.zeros((c, z.shape[1])), np.zeros((c, z.shape[1])), np.zeros(c, int)
    for k in range(c):
        zk = z[y == k]
        cnt[k] = len(zk)
        if len(zk) >= 2:
            cmu[k], csig[k] = zk.mean(0), zk.std(0, ddof=1)
    return mu, sigma, cmu, csig, cnt


def _accumulate(z: np.ndarray, y: np.ndarray | None, c: int, batch: int) -> MomentAccumulator:
    acc = MomentAccumulator(c, z.shape[1])
    for s in range(0, len(z), batch):
        acc.update(
            torch.from_numpy(z[s : s + batch]),
            None if y is None else torch.from_numpy(y[s : s + batch]),
        )
    return acc


# ------------------------------------------------------------------------------------------
# projection
# ------------------------------------------------------------------------------------------
def test_projection_orthonormal_deterministic():
    p = projection_matrix(84, 10, seed=7)
    assert p.shape == (10, 84) and p.dtype == torch.float32
    gram = (p.double() @ p.double().T).numpy()
    np.testing.assert_allclose(gram, np.eye(10), atol=1e-6)
    assert torch.equal(p, projection_matrix(84, 10, seed=7))
    assert not torch.allclose(p, projection_matrix(84, 10, seed=8))
    sq = projection_matrix(5, 5, seed=0)  # square: an orthogonal matrix
    np.testing.assert_allclose((sq.double() @ sq.double().T).numpy(), np.eye(5), atol=1e-6)


def test_projection_rejects_bad_dims():
    with pytest.raises(ValueError, match="dim_out"):
        projection_matrix(4, 5, seed=0)
    with pytest.raises(ValueError):
        projection_matrix(4, 0, seed=0)


# ------------------------------------------------------------------------------------------
# streaming moments
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 7, 64, 1000])
def test_accumulator_matches_numpy(batch):
    rng = np.random.default_rng(0)
    c, k, n = 5, 4, 300
    y = rng.integers(0, 4, size=n)  # class 4 never occurs
    y[0] = 3
    y[y == 3] = 2
    y[0] = 3  # class 3 has exactly one sample: absent
    z = rng.normal(size=(n, k)) * rng.uniform(0.5, 3, size=k) + y[:, None]
    d = _accumulate(z, y, c, batch).finalize()
    mu, sigma, cmu, csig, cnt = _reference_moments(z, y, c)
    np.testing.assert_allclose(d.mu, mu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.sigma, sigma, rtol=1e-10)
    np.testing.assert_allclose(d.class_mu, cmu, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(d.class_sigma, csig, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(d.class_counts, cnt)
    assert d.n == n and d.class_counts.sum() == n
    np.testing.assert_array_equal(d.present, [True, True, True, False, False])
    assert np.all(d.class_mu[3] == 0) and np.all(d.class_sigma[3] == 0)


def test_accumulator_is_stable_for_large_offsets():
    # mean 1e5, std 1e-3: E[z^2] - mu^2 in float64 would lose all digits of the variance.
    rng = np.random.default_rng(1)
    z = 1e5 + 1e-3 * rng.normal(size=(5000, 2))
    y = rng.integers(0, 2, size=5000)
    d = _accumulate(z, y, 2, 100).finalize()
    np.testing.assert_allclose(d.sigma, z.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(d.class_sigma[1], z[y == 1].std(0, ddof=1), rtol=1e-6)


def test_accumulator_label_free_and_errors():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(50, 3))
    acc = _accumulate(z, None, 4, 16)
    with pytest.raises(ValueError, match="no labels"):
        acc.finalize()
    d = acc.finalize(label_free=True)
    assert d.is_label_free and d.n == 50
    np.testing.assert_allclose(d.sigma, z.std(0, ddof=1))
    with pytest.raises(ValueError, match="no samples"):
        MomentAccumulator(4, 3).finalize()
    acc = MomentAccumulator(4, 3)
    with pytest.raises(ValueError, match="labels"):
        acc.update(torch.zeros(2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="columns"):
        acc.update(torch.zeros(2, 5), torch.tensor([0, 1]))
    one = MomentAccumulator(2, 3)
    one.update(torch.ones(1, 3), torch.tensor([0]))
    d1 = one.finalize()
    assert d1.n == 1 and np.all(d1.sigma == 0) and not d1.present.any()


# ------------------------------------------------------------------------------------------
# container and wire format
# ------------------------------------------------------------------------------------------
def _descriptor(rng, c=10, k=10, n=500) -> FluxDescriptor:
    z = rng.normal(size=(n, k))
    y = rng.integers(0, c, size=n)
    return _accumulate(z, y, c, 128).finalize()


def test_round_trip_and_payload_size():
    d = _descriptor(np.random.default_rng(3))
    arrs = d.to_arrays()
    assert set(arrs) == set(descriptor_keys(False))
    assert arrs["mu"].dtype == np.float32 and arrs["class_counts"].dtype == np.int64
    assert arrs["n"].shape == (1,)
    back = FluxDescriptor.from_arrays(arrs, num_classes=10, dim=10, label_free=False)
    np.testing.assert_allclose(back.class_mu, d.class_mu, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(back.class_counts, d.class_counts)
    assert d.num_payload_floats() == 220  # 2K(C+1) for K = C = 10
    assert d.num_payload_bytes() == 220 * 4 + 11 * 8
    lf = d.label_free()
    assert lf.is_label_free and lf.num_payload_floats() == 20
    assert set(lf.to_arrays()) == {"mu", "sigma", "n"}
    lf2 = FluxDescriptor.from_arrays(lf.to_arrays(), num_classes=10, dim=10, label_free=True)
    np.testing.assert_allclose(lf2.mu, d.mu, rtol=1e-6)
    with pytest.raises(ValueError):
        _ = lf.present


def _corrupt(key, value):
    def f(a):
        a = dict(a)
        if value is None:
            del a[key]
        else:
            a[key] = value(a[key]) if callable(value) else value
        return a

    return f


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (_corrupt("mu", None), "missing key"),
        (lambda a: {**a, "extra": np.zeros(1, np.float32)}, "unexpected key"),
        (_corrupt("mu", lambda v: v[:-1]), "shape"),
        (_corrupt("class_mu", lambda v: v.reshape(-1)), "shape"),
        (_corrupt("sigma", lambda v: v.astype(np.int64)), "floating"),
        (_corrupt("class_counts", lambda v: v.astype(np.float32)), "integer"),
        (_corrupt("n", lambda v: v.astype(bool)), "integer"),
        (
            _corrupt(
                "mu", lambda v: np.where(np.arange(v.size) == 0, np.nan, v).astype(np.float32)
            ),
            "non-finite",
        ),
        (_corrupt("class_sigma", lambda v: v + np.float32(np.inf)), "non-finite"),
        (_corrupt("sigma", lambda v: -v), "negative"),
        (_corrupt("class_counts", lambda v: v - v.max() - 1), "negative"),
        (_corrupt("mu", lambda v: v + np.float32(2e6)), "|value|"),
        (_corrupt("n", lambda v: v + 1), "inconsistent"),
        (_corrupt("n", lambda v: np.array([0], np.int64)), "at least one"),
        (_corrupt("mu", lambda v: v.tolist()), "numpy array"),
        (_corrupt("mu", lambda v: np.array(["a"] * v.size)), "floating"),
    ],
)
def test_from_arrays_rejects_bad_payloads(mutate, reason):
    good = _descriptor(np.random.default_rng(4)).to_arrays()
    with pytest.raises(DescriptorError, match=reason.replace("|", r"\|")):
        FluxDescriptor.from_arrays(mutate(good), num_classes=10, dim=10, label_free=False)


def test_from_arrays_kind_mismatch_and_absent_rows():
    d = _descriptor(np.random.default_rng(5))
    with pytest.raises(DescriptorError, match="unexpected key"):
        FluxDescriptor.from_arrays(d.to_arrays(), num_classes=10, dim=10, label_free=True)
    with pytest.raises(DescriptorError, match="missing key"):
        FluxDescriptor.from_arrays(
            d.label_free().to_arrays(), num_classes=10, dim=10, label_free=False
        )
    arrs = d.to_arrays()
    arrs["class_counts"] = arrs["class_counts"].copy()
    moved = int(arrs["class_counts"][0])
    arrs["class_counts"][0] = 0
    arrs["class_counts"][1] += moved  # keep sum == n
    back = FluxDescriptor.from_arrays(arrs, num_classes=10, dim=10, label_free=False)
    assert not back.present[0] and np.all(back.class_mu[0] == 0)  # absent rows never carry values


# ------------------------------------------------------------------------------------------
# compute_flux_descriptor
# ------------------------------------------------------------------------------------------
def _linear_features(seed=0, d_in=6, d_feat=12):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, d_feat, generator=g)
    return lambda x: torch.relu(x @ w).reshape(x.shape[0], 3, 4)  # non-flat output on purpose


def test_compute_descriptor_matches_direct_computation():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(400, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=400))
    feats = _linear_features()
    p = projection_matrix(12, 3, seed=11)
    batches = [(x[s : s + 50], y[s : s + 50]) for s in range(0, 400, 50)]
    d = compute_flux_descriptor(feats, batches, p, num_classes=3)
    z = (feats(x).reshape(400, -1) @ p.T).double().numpy()
    mu, sigma, cmu, csig, cnt = _reference_moments(z, y.numpy(), 3)
    np.testing.assert_allclose(d.mu, mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(d.class_sigma, csig, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(d.class_counts, cnt)
    lf = compute_flux_descriptor(feats, batches, p, num_classes=3, label_free=True)
    assert lf.is_label_free
    np.testing.assert_allclose(lf.sigma, sigma, rtol=1e-5)


def test_compute_descriptor_clip():
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.normal(size=(300, 6)).astype(np.float32) * 10)
    y = torch.from_numpy(rng.integers(0, 2, size=300))
    feats = _linear_features()
    p = projection_matrix(12, 4, seed=1)
    clip = 0.5
    d = compute_flux_descriptor(feats, [(x, y)], p, num_classes=2, clip_norm=clip)
    f = feats(x).reshape(300, -1)
    f = f * torch.clamp(clip / f.norm(dim=1, keepdim=True), max=1.0)
    z = (f @ p.T).double().numpy()
    assert np.linalg.norm(z, axis=1).max() <= clip * (1 + 1e-5)
    np.testing.assert_allclose(d.mu, z.mean(0), rtol=1e-5, atol=1e-7)
    assert np.linalg.norm(d.mu) <= clip
    unclipped = compute_flux_descriptor(feats, [(x, y)], p, num_classes=2)
    assert np.linalg.norm(unclipped.mu) > clip  # the clip really changed something


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compute_descriptor_on_cuda_matches_cpu():
    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.normal(size=(256, 6)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, 3, size=256))
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 12, generator=g)
    p = projection_matrix(12, 3, seed=2)
    cpu = compute_flux_descriptor(lambda a: a @ w, [(x, y)], p, 3)
    wc = w.cuda()
    gpu = compute_flux_descriptor(lambda a: a @ wc, [(x.cuda(), y.cuda())], p, 3)
    np.testing.assert_allclose(gpu.class_mu, cpu.class_mu, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------
# privacy
# ------------------------------------------------------------------------------------------
def _clipped_descriptor(rng, n=400, c=3, k=4, clip=1.0):
    z = rng.normal(size=(n, k))
    z *= np.minimum(1.0, clip / np.linalg.norm(z, axis=1))[:, None]
    y = rng.integers(0, c, size=n)
    return _accumulate(z, y, c, 1000).finalize(), z, y


def test_sensitivity_bounds_hold_for_replace_one():
    rng = np.random.default_rng(9)
    clip, n, k = 1.0, 50, 4
    worst_mu = worst_m2 = 0.0
    for _ in range(300):
        z = rng.normal(size=(n, k))
        z *= np.minimum(1.0, clip / np.linalg.norm(z, axis=1))[:, None]
        z2 = z.copy()
        new = rng.normal(size=k)
        z2[rng.integers(n)] = clip * new / np.linalg.norm(new)
        worst_mu = max(worst_mu, np.linalg.norm(z2.mean(0) - z.mean(0)))
        worst_m2 = max(worst_m2, np.linalg.norm((z2**2).mean(0) - (z**2).mean(0)))
    assert worst_mu <= 2 * clip / n + 1e-12
    assert worst_m2 <= math.sqrt(2) * clip**2 / n + 1e-12
    # The second-moment bound is attained with disjoint supports.
    a, b = np.zeros((n, k)), np.zeros((n, k))
    a[0, 0], b[0, 1] = clip, clip
    np.testing.assert_allclose(
        np.linalg.norm((a**2).mean(0) - (b**2).mean(0)), math.sqrt(2) * clip**2 / n
    )


def test_privatize_gaussian_noise_scale():
    rng = np.random.default_rng(10)
    d, _, _ = _clipped_descriptor(rng)
    clip, mult = 1.0, 2.0
    gen = np.random.default_rng(0)
    draws = np.stack([privatize(d, clip, mult, "gaussian", gen).mu for _ in range(2000)])
    np.testing.assert_allclose(draws.std(0), mult * 2 * clip / d.n, rtol=0.08)
    np.testing.assert_allclose(
        draws.mean(0), d.mu, atol=5 * mult * 2 * clip / d.n / math.sqrt(2000)
    )
    out = privatize(d, clip, mult, "gaussian", gen)
    np.testing.assert_array_equal(out.class_counts, d.class_counts)
    assert out.n == d.n and np.all(out.sigma >= 0) and np.all(out.class_sigma >= 0)
    assert not np.allclose(out.class_mu, d.class_mu)


def test_privatize_laplace_scale_and_torch_generator():
    rng = np.random.default_rng(11)
    d, _, _ = _clipped_descriptor(rng, k=4)
    clip, mult = 1.0, 1.0
    g = torch.Generator().manual_seed(5)
    draws = np.stack([privatize(d, clip, mult, "laplace", g).mu for _ in range(2000)])
    b = mult * 2 * math.sqrt(4) * clip / d.n  # Laplace scale; std = sqrt(2) b
    np.testing.assert_allclose(draws.std(0), math.sqrt(2) * b, rtol=0.1)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    np.testing.assert_array_equal(
        privatize(d, clip, mult, "laplace", g1).class_sigma,
        privatize(d, clip, mult, "laplace", g2).class_sigma,
    )


def test_privatize_zero_noise_identity_and_errors():
    rng = np.random.default_rng(12)
    d, _, _ = _clipped_descriptor(rng)
    same = privatize(d, 1.0, 0.0, "gaussian", np.random.default_rng(0))
    np.testing.assert_allclose(same.sigma, d.sigma, rtol=1e-10)
    np.testing.assert_allclose(same.class_sigma, d.class_sigma, rtol=1e-10, atol=1e-12)
    lf = privatize(d.label_free(), 1.0, 1.0, "gaussian", np.random.default_rng(0))
    assert lf.is_label_free
    with pytest.raises(ValueError, match="not clipped"):
        privatize(d, 0.1, 1.0, "gaussian", np.random.default_rng(0))  # moments exceed clip 0.1
    with pytest.raises(ValueError):
        privatize(d, 1.0, 1.0, "exponential", np.random.default_rng(0))
    with pytest.raises(ValueError):
        privatize(d, 0.0, 1.0)
    # Huge noise: sigma is clipped at 0, never negative or NaN.
    big = privatize(d, 1.0, 1e4, "gaussian", np.random.default_rng(1))
    assert np.all(np.isfinite(big.sigma)) and np.all(big.sigma >= 0)
