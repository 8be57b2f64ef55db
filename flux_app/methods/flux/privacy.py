"""The privacy guarantee of FLUX's noisy descriptors: results.json's ``final.privacy``.

The derivation is in docs/DECISIONS.md ("Descriptor privacy") and in
:func:`~flux_app.methods.flux.descriptors.privatize`. In short:

* Privacy unit: one sample of one client. Neighbouring datasets differ by *replacing* one
  sample by another with the same label; ``n`` and the class counts are sent exactly, so they
  are public.
* A released *vector* is one group's mean or raw second moment (the group is the marginal or one
  class). Its noise is ``m`` (``flux-dp-noise``) times its sensitivity under the clip ``C``
  (:func:`~flux_app.methods.flux.descriptors.moment_sensitivity`), so each vector alone is a
  Gaussian mechanism with ``std / sensitivity = m`` (Laplace: ``scale / L1 sensitivity = m``).
* One sample enters :data:`VECTORS_PER_SAMPLE` vectors of a release: 4 in a full descriptor
  (the marginal pair and its class's pair, the other classes do not see it), 2 in a label-free
  one.
* Every release of a client composes (all of them, whatever the split: an upper bound that also
  holds if the train and test data overlap). With ``v`` vectors in total, Gaussian noise composes
  exactly into one Gaussian mechanism of noise multiplier ``m / sqrt(v)``; its ``epsilon`` at
  ``delta`` comes from dp-accounting's analytic Gaussian mechanism (Balle and Wang, 2018).
  Laplace is pure DP: ``epsilon = v / m``, ``delta = 0`` (no accountant needed).

The reported guarantee is the worst over the clients (the most vectors released).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger("flwr")

#: Released vectors (mean or raw second moment of one group) one sample enters, per release kind.
VECTORS_PER_SAMPLE: dict[str, int] = {"full": 4, "label_free": 2}

#: The accountant's PyPI name (the ``privacy`` extra of this package installs it).
ACCOUNTANT = "dp-accounting"

PROTECTS = (
    "each single sample of a client's data against whoever sees its descriptors (the server), "
    "for the extractor it was given: replacing one sample by another with the same label "
    "changes what the descriptors reveal by at most (epsilon, delta)"
)
DOES_NOT_PROTECT = (
    "model updates, losses and evaluation metrics (not noised); n, class counts and the sizes "
    "and group in query.info (sent exactly); a whole client's membership; a server that asks "
    "for less noise (a node applies the dp-noise the server's query asks for)"
)
#: added when flux-dp-seeded-noise is on
SEEDED_CAVEAT = (
    "flux-dp-seeded-noise is on: the noise derives from the run seed and the partition id, so "
    "anyone who knows the run-config (the server) can regenerate and subtract it; this is a "
    "reproducible simulation of the mechanism, not a guarantee against the server"
)

_SENSITIVITY = {
    "gaussian": {"norm": "L2", "mean": "2*C/n", "second_moment": "sqrt(2)*C**2/n"},
    "laplace": {"norm": "L1", "mean": "2*sqrt(K)*C/n", "second_moment": "2*C**2/n"},
}


def vectors(releases: Mapping[str, int]) -> int:
    """Vectors one sample enters over ``releases`` (kind -> count, kinds of
    :data:`VECTORS_PER_SAMPLE`)."""
    return sum(VECTORS_PER_SAMPLE[kind] * int(count) for kind, count in releases.items())


def accountant_version() -> str | None:
    """``"dp-accounting <version>"``, or ``None`` when it is not installed."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return None
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"{ACCOUNTANT} {version(ACCOUNTANT)}"
    except PackageNotFoundError:  # importable but not installed as a distribution
        return f"{ACCOUNTANT} (unknown version)"


def gaussian_epsilon(noise_multiplier: float, num_vectors: int, delta: float) -> float:
    """``epsilon`` at ``delta`` of ``num_vectors`` composed Gaussian mechanisms, each with
    ``std / L2 sensitivity = noise_multiplier``.

    Parameters
    ----------
    noise_multiplier : float
        ``m > 0``.
    num_vectors : int
        ``v >= 0``; the composition is one Gaussian mechanism of multiplier ``m / sqrt(v)``.
    delta : float
        In ``(0, 1)``.

    Returns
    -------
    float
        The smallest ``epsilon`` (dp-accounting's analytic Gaussian mechanism; 0 when ``v = 0``).

    Raises
    ------
    ImportError
        dp-accounting is not installed.
    """
    if noise_multiplier <= 0:
        raise ValueError("noise_multiplier must be > 0")
    if not 0 < delta < 1:
        raise ValueError("delta must lie in (0, 1)")
    if num_vectors <= 0:
        return 0.0
    from dp_accounting import get_epsilon_gaussian

    return float(get_epsilon_gaussian(noise_multiplier / math.sqrt(num_vectors), delta))


def laplace_epsilon(noise_multiplier: float, num_vectors: int) -> float:
    """Pure ``epsilon`` of ``num_vectors`` composed Laplace mechanisms, each with
    ``scale / L1 sensitivity = noise_multiplier``: ``num_vectors / noise_multiplier``."""
    if noise_multiplier <= 0:
        raise ValueError("noise_multiplier must be > 0")
    return max(int(num_vectors), 0) / float(noise_multiplier)


def count_releases(releases: dict[str, dict[str, int]], names: Iterable[str], *kinds: str) -> None:
    """Add one release of each of ``kinds`` for every client of ``names`` (in place)."""
    for name in names:
        counts = releases.setdefault(name, {})
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1


def worst_client(
    releases: Mapping[str, Mapping[str, int]],
) -> tuple[str | None, dict[str, int]]:
    """The client whose releases touch a sample most often, and its counts per kind."""
    best: tuple[str | None, dict[str, int]] = (None, {k: 0 for k in VECTORS_PER_SAMPLE})
    for name in sorted(releases):
        counts = {k: int(releases[name].get(k, 0)) for k in VECTORS_PER_SAMPLE}
        if best[0] is None or vectors(counts) > vectors(best[1]):
            best = (name, counts)
    return best


def privacy_report(
    *,
    mechanism: str,
    noise_multiplier: float,
    clip_norm: float,
    delta: float,
    releases: Mapping[str, Mapping[str, int]],
    seeded_noise: bool = False,
) -> dict[str, Any] | None:
    """The ``privacy`` entry of results.json's ``final``; ``None`` when noise is off.

    Parameters
    ----------
    mechanism : {"gaussian", "laplace"}
        ``flux-dp-mechanism``.
    noise_multiplier : float
        ``flux-dp-noise`` (0 = no noise: no guarantee, ``None``).
    clip_norm : float
        ``flux-dp-clip``.
    delta : float
        ``flux-dp-delta`` (Gaussian only; Laplace is pure DP).
    releases : Mapping[str, Mapping[str, int]]
        Client name -> descriptor releases it was asked for, per kind (``"full"``,
        ``"label_free"``).
    seeded_noise : bool
        ``flux-dp-seeded-noise``: the noise is reproducible from the run's seed, so the
        guarantee does not hold against the server (``holds_against_the_server`` is false).

    Returns
    -------
    dict or None
        ``mechanism``, ``noise_multiplier``, ``clip``, ``neighbouring``, ``sensitivity``,
        ``releases`` (of the worst client), ``releases_by_kind``, ``worst_client``,
        ``vectors_per_sample``, ``epsilon``, ``delta``, ``accountant``, ``protects``,
        ``does_not_protect``; Gaussian adds ``composed_noise_multiplier``. When the accountant
        is missing (Gaussian), ``epsilon`` and ``accountant`` are ``None`` and ``reason`` says
        why; a warning is logged.
    """
    if noise_multiplier <= 0:
        return None
    if mechanism not in _SENSITIVITY:
        raise ValueError(f"mechanism must be 'gaussian' or 'laplace', got {mechanism!r}")
    name, counts = worst_client(releases)
    v = vectors(counts)
    m = float(noise_multiplier)
    out: dict[str, Any] = {
        "mechanism": mechanism,
        "noise_multiplier": m,
        "clip": float(clip_norm),
        "neighbouring": "replace one sample by another with the same label (n, n_c public)",
        "sensitivity": dict(_SENSITIVITY[mechanism]),
        "releases": sum(counts.values()),
        "releases_by_kind": counts,
        "worst_client": name,
        "vectors_per_sample": v,
    }
    if mechanism == "laplace":
        out.update(
            epsilon=laplace_epsilon(m, v),
            delta=0.0,
            accountant="closed form: pure epsilons add up",
        )
    else:
        out["composed_noise_multiplier"] = m / math.sqrt(v) if v else None
        found = accountant_version()
        if found is None:
            reason = (
                f"{ACCOUNTANT} is not installed (pip install 'flux-app[privacy]'): "
                "no epsilon computed"
            )
            logger.warning("flux privacy: %s", reason)
            out.update(epsilon=None, delta=float(delta), accountant=None, reason=reason)
        else:
            out.update(
                epsilon=gaussian_epsilon(m, v, delta),
                delta=float(delta),
                accountant=f"{found} (get_epsilon_gaussian)",
            )
    out["seeded_noise"] = bool(seeded_noise)
    out["holds_against_the_server"] = not seeded_noise
    out["protects"] = PROTECTS
    out["does_not_protect"] = DOES_NOT_PROTECT + ("; " + SEEDED_CAVEAT if seeded_noise else "")
    return out


__all__ = [
    "DOES_NOT_PROTECT",
    "PROTECTS",
    "VECTORS_PER_SAMPLE",
    "accountant_version",
    "count_releases",
    "gaussian_epsilon",
    "laplace_epsilon",
    "privacy_report",
    "vectors",
    "worst_client",
]
