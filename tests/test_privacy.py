"""The (epsilon, delta) of noisy FLUX descriptors: accountant, sensitivity, results.json entry."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from scipy.optimize import brentq
from scipy.stats import norm

from flux_app.engine.config import ConfigError, RunConfig
from flux_app.methods.flux import privacy
from flux_app.methods.flux.descriptors import (
    compute_flux_descriptor,
    moment_sensitivity,
    projection_matrix,
)
from flux_app.testing import FAST, comparable, run, run_and_resume

#: the accountant is an optional dependency (the ``privacy`` and ``test`` extras install it)
needs_accountant = pytest.mark.skipif(
    privacy.accountant_version() is None, reason="dp-accounting is not installed"
)


# ------------------------------------------------------------------------------ accountant
def _gdp_delta(eps: float, mu: float) -> float:
    """Exact delta(eps) of a Gaussian mechanism with sensitivity / std = mu (Balle & Wang)."""
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps + norm.logcdf(-eps / mu - mu / 2))


@needs_accountant
@pytest.mark.parametrize(("m", "v", "delta"), [(1.0, 4, 1e-5), (3.0, 6, 1e-6), (0.7, 2, 1e-3)])
def test_gaussian_epsilon_is_the_exact_gaussian_bound(m, v, delta):
    eps = privacy.gaussian_epsilon(m, v, delta)
    mu = math.sqrt(v) / m  # v vectors, each sensitivity / std = 1/m, compose to sqrt(v)/m
    exact = brentq(lambda e: _gdp_delta(e, mu) - delta, 0.0, 200.0, xtol=1e-12)
    assert eps == pytest.approx(exact, rel=1e-6)
    assert _gdp_delta(eps, mu) <= delta * (1 + 1e-6)


@needs_accountant
def test_gaussian_epsilon_agrees_with_the_pld_accountant():
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    acc = PLDAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(2.0), 4))  # 4 vectors, multiplier 2 each
    assert privacy.gaussian_epsilon(2.0, 4, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-3)


@needs_accountant
def test_epsilon_monotone_in_noise_releases_and_delta():
    eps = privacy.gaussian_epsilon
    assert eps(2.0, 4, 1e-5) < eps(1.0, 4, 1e-5)  # more noise
    assert eps(1.0, 4, 1e-5) < eps(1.0, 8, 1e-5)  # more releases
    assert eps(1.0, 4, 1e-3) < eps(1.0, 4, 1e-5)  # larger delta
    assert eps(1.0, 0, 1e-5) == 0.0
    assert privacy.laplace_epsilon(2.0, 6) == 3.0
    with pytest.raises(ValueError):
        eps(0.0, 4, 1e-5)
    with pytest.raises(ValueError):
        eps(1.0, 4, 1.0)


@needs_accountant
def test_report_worst_client_and_kinds():
    releases = {"a": {"full": 1, "label_free": 1}, "b": {"label_free": 1}, "c": {"full": 1}}
    rep = privacy.privacy_report(
        mechanism="gaussian", noise_multiplier=1.5, clip_norm=2.0, delta=1e-5, releases=releases
    )
    assert rep["worst_client"] == "a" and rep["releases"] == 2
    assert rep["releases_by_kind"] == {"full": 1, "label_free": 1}
    assert rep["vectors_per_sample"] == 6
    assert rep["epsilon"] == privacy.gaussian_epsilon(1.5, 6, 1e-5)
    assert rep["composed_noise_multiplier"] == pytest.approx(1.5 / math.sqrt(6))
    assert rep["accountant"].startswith("dp-accounting ")
    lap = privacy.privacy_report(
        mechanism="laplace", noise_multiplier=2.0, clip_norm=2.0, delta=1e-5, releases=releases
    )
    assert lap["epsilon"] == 3.0 and lap["delta"] == 0.0 and lap["sensitivity"]["norm"] == "L1"
    off = privacy.privacy_report(
        mechanism="gaussian", noise_multiplier=0.0, clip_norm=2.0, delta=1e-5, releases=releases
    )
    assert off is None


def test_missing_accountant_reports_null_and_warns(monkeypatch, caplog):
    monkeypatch.setattr(privacy, "accountant_version", lambda: None)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        rep = privacy.privacy_report(
            mechanism="gaussian",
            noise_multiplier=1.0,
            clip_norm=1.0,
            delta=1e-5,
            releases={"0": {"full": 1}},
        )
    assert rep["epsilon"] is None and rep["accountant"] is None
    assert "not installed" in rep["reason"] and "not installed" in caplog.text


def test_delta_is_validated():
    assert RunConfig.from_mapping({"flux-dp-delta": 1e-6}).to_dict()["flux-dp-delta"] == 1e-6
    for bad in (0.0, 1.0, -1e-5):
        with pytest.raises(ConfigError, match="flux-dp-delta"):
            RunConfig.from_mapping({"flux-dp-delta": bad})


# ------------------------------------------------------------------------------ sensitivity
def _released(x: np.ndarray, y: np.ndarray, proj: torch.Tensor, classes: int, clip: float):
    """The vectors privatize noises: (mean, raw second moment) of the marginal and each class."""
    d = compute_flux_descriptor(
        lambda xb: xb,
        [(torch.from_numpy(x), torch.from_numpy(y))],
        proj,
        classes,
        clip_norm=clip,
    )
    out = {"marginal": (d.mu, d.sigma**2 * (d.n - 1) / d.n + d.mu**2)}
    for c in np.flatnonzero(d.present):
        n_c = int(d.class_counts[c])
        m2 = d.class_sigma[c] ** 2 * (n_c - 1) / n_c + d.class_mu[c] ** 2
        out[int(c)] = (d.class_mu[c], m2)
    return out, d


def test_one_replaced_sample_moves_the_descriptor_within_the_sensitivity():
    rng = np.random.default_rng(0)
    dim_in, k, classes, clip = 8, 3, 3, 1.5
    proj = projection_matrix(dim_in, k, 7)
    lift = proj.double().numpy().T  # P^T: its image projects back exactly, same norm
    worst = np.zeros(4)  # attained fraction of each bound: L2 mean, L2 m2, L1 mean, L1 m2
    for trial in range(40):
        n = int(rng.integers(6, 30))
        y = rng.integers(0, classes, n)
        y[:6] = np.repeat(np.arange(classes), 2)  # every class present
        x = rng.normal(0, rng.choice([0.1, 1.0, 10.0]), (n, dim_in))  # clipped or not
        i = int(rng.integers(n))
        x2 = x.copy()
        if trial % 4 == 0:  # worst case of the mean (L2): z = C e_1 -> -C e_1
            x[i], x2[i] = lift @ (clip * np.eye(k)[0]), lift @ (-clip * np.eye(k)[0])
        elif trial % 4 == 1:  # worst case of the second moment: disjoint supports
            x[i], x2[i] = lift @ (clip * np.eye(k)[0]), lift @ (clip * np.eye(k)[1])
        elif trial % 4 == 2:  # worst case of the mean (L1): z = C (1..1)/sqrt(K) -> -z
            z = clip * np.ones(k) / math.sqrt(k)
            x[i], x2[i] = lift @ z, lift @ -z
        else:
            x2[i] = rng.normal(0, 50.0, dim_in)  # far outside the clip
        a, da = _released(x.astype(np.float32), y, proj, classes, clip)
        b, _ = _released(x2.astype(np.float32), y, proj, classes, clip)
        for group in a:
            n_g = da.n if group == "marginal" else int(da.class_counts[group])
            if group not in ("marginal", int(y[i])):  # other classes do not see the sample
                np.testing.assert_allclose(a[group][0], b[group][0], atol=1e-12)
                np.testing.assert_allclose(a[group][1], b[group][1], atol=1e-12)
                continue
            d_mu, d_m2 = a[group][0] - b[group][0], a[group][1] - b[group][1]
            l2 = moment_sensitivity(clip, n_g, k, "gaussian")
            l1 = moment_sensitivity(clip, n_g, k, "laplace")
            tol = 1 + 1e-5  # float32 features
            assert np.linalg.norm(d_mu) <= l2[0] * tol
            assert np.linalg.norm(d_m2) <= l2[1] * tol
            assert np.abs(d_mu).sum() <= l1[0] * tol
            assert np.abs(d_m2).sum() <= l1[1] * tol
            moved = [np.linalg.norm(d_mu) / l2[0], np.linalg.norm(d_m2) / l2[1]]
            moved += [np.abs(d_mu).sum() / l1[0], np.abs(d_m2).sum() / l1[1]]
            worst = np.maximum(worst, moved)
    assert np.all(worst > 0.999), worst  # every bound is attained: they are tight


# ------------------------------------------------------------------------------ in a run
@needs_accountant
def test_flux_run_reports_privacy_with_noise_and_null_without(tmp_path):
    cfg = FAST | {
        "strategy": "flux",
        "flux-cluster-round": 1,
        "holdout-clients": 1,
        "output-dir": str(tmp_path),
        "run-name": "privacy",
        "flux-dp-clip": 1.0,
    }
    results, _ = run(cfg | {"flux-dp-noise": 2.0, "flux-dp-delta": 1e-6}, nodes=4)
    rep = results["final"]["privacy"]
    # A training node: 2 full descriptors (clustering: train split + the val split's noise
    # check) + 1 label-free (test-phase routing); counted as if one sample were in all three.
    assert rep["releases_by_kind"] == {"full": 2, "label_free": 1}
    assert rep["vectors_per_sample"] == 10 and rep["delta"] == 1e-6
    assert rep["epsilon"] == pytest.approx(privacy.gaussian_epsilon(2.0, 10, 1e-6))
    assert rep["mechanism"] == "gaussian" and rep["noise_multiplier"] == 2.0 and rep["clip"] == 1.0
    assert rep["protects"] and rep["does_not_protect"]
    results, _ = run(cfg, nodes=4)
    assert results["final"]["privacy"] is None


@needs_accountant
def test_release_counts_survive_a_resume(tmp_path):
    cfg = FAST | {
        "strategy": "flux",
        "flux-cluster-round": 1,
        "flux-dp-clip": 1.0,
        "flux-dp-noise": 2.0,
        "flux-dp-seeded-noise": True,  # an exact replay needs reproducible noise
    }  # clusters in round 1, killed at the start of round 2: round 1's releases must come back
    full, resumed = run_and_resume(cfg, 4, kill_round=2, output_dir=str(tmp_path))
    assert resumed["resumed"], "the run must have been resumed"
    assert full["final"]["privacy"]["releases_by_kind"] == {"full": 2, "label_free": 1}
    assert comparable(resumed)["final"]["privacy"] == comparable(full)["final"]["privacy"]
