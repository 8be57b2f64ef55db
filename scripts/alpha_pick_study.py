#!/usr/bin/env python
"""FedDAG's alpha pick rules on synthetic federations (no training: seconds).

Compares ``feddag-alpha-pick = "stable"`` (the partition of the longest run of alphas, our
default) with ``"lowest-loss"`` (the paper's: lowest ``L = L1 + lambda L2``, then the largest
alpha), under both ``feddag-linkage`` values (UPGMA ``average``, WPGMA ``weighted``), by the
adjusted Rand index of the chosen partition against the planted groups. Each federation is a
fused-distance matrix as FedDAG clusters it: symmetric, zero diagonal, min-max scaled over the
off-diagonal entries to [0, 1]. Two generators:

* ``points``: each client is its group's centre (``N(0, I_20)``) plus its own ``N(0, s^2 I_20)``
  noise; distance = Euclidean. ``s`` sets how noisy the groups are. ``K = 1`` is an IID
  federation (the right answer is one cluster).
* ``blocks``: the tests' planted matrices (tests/test_agglomerative.py): within a group
  ``U(0, w)``, between groups ``U(b, 1)``, symmetrised.

Example
-------
    python scripts/alpha_pick_study.py --seeds 10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from flux_app.common.agglomerative import alpha_sweep  # noqa: E402

#: (name, generator, group sizes, noise): ``s`` for points, ``(w, b)`` for blocks
SETTINGS: list[tuple[str, str, list[int], object]] = [
    ("points IID s=0.5", "points", [40], 0.5),
    ("points K=2 s=0.5", "points", [20, 20], 0.5),
    ("points K=4 s=0.5", "points", [10] * 4, 0.5),
    ("points K=4 s=0.9", "points", [10] * 4, 0.9),
    ("points K=3 sizes 30/15/5 s=0.5", "points", [30, 15, 5], 0.5),
    ("points K=6 s=0.3", "points", [8] * 6, 0.3),
    ("points K=6 s=0.7", "points", [8] * 6, 0.7),
    ("points K=10 s=0.2", "points", [6] * 10, 0.2),
    ("points K=10 s=0.5", "points", [6] * 10, 0.5),
    ("blocks K=4 w=0.05 b=0.6", "blocks", [15] * 4, (0.05, 0.6)),
    ("blocks K=4 w=0.3 b=0.5", "blocks", [15] * 4, (0.3, 0.5)),
    ("blocks K=5 w=0.4 b=0.5", "blocks", [12] * 5, (0.4, 0.5)),
]
RULES = [(link, pick) for link in ("average", "weighted") for pick in ("stable", "lowest-loss")]


def minmax_offdiag(m: np.ndarray) -> np.ndarray:
    """Symmetric ``m`` scaled to [0, 1] over its off-diagonal entries, zero diagonal."""
    off = m[~np.eye(len(m), dtype=bool)]
    out = (m - off.min()) / max(off.max() - off.min(), 1e-12)
    np.fill_diagonal(out, 0.0)
    return out


def federation(
    kind: str, sizes: list[int], noise: object, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """A fused-distance matrix ``[n, n]`` in [0, 1] and the planted group of each client."""
    lab = np.repeat(np.arange(len(sizes)), sizes)
    n = lab.size
    if kind == "points":
        centres = rng.normal(0.0, 1.0, (len(sizes), 20))
        x = centres[lab] + rng.normal(0.0, float(noise), (n, 20))
        m = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0.0))
    else:
        within, between = noise
        m = np.where(
            lab[:, None] == lab[None, :],
            rng.uniform(0.0, within, (n, n)),
            rng.uniform(between, 1.0, (n, n)),
        )
        m = 0.5 * (m + m.T)
    return minmax_offdiag(m), lab


def main(argv: list[str] | None = None) -> None:
    """Print one markdown row per setting: mean ARI (mean number of clusters) per rule."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=10, help="federations per setting")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    head = " | ".join(f"{'UPGMA' if link == 'average' else 'WPGMA'} {pick}" for link, pick in RULES)
    print(f"| setting | n | K | {head} |")
    print("|---|---|---|" + "---|" * len(RULES))
    totals = np.zeros(len(RULES))
    for name, kind, sizes, noise in SETTINGS:
        ari = np.zeros((args.seeds, len(RULES)))
        count = np.zeros((args.seeds, len(RULES)))
        for seed in range(args.seeds):
            a, lab = federation(kind, sizes, noise, np.random.default_rng(seed))
            for r, (link, pick) in enumerate(RULES):
                res = alpha_sweep(a, linkage=link, pick=pick)
                ari[seed, r] = adjusted_rand_score(lab, res.labels)
                count[seed, r] = res.num_chosen
        totals += ari.mean(axis=0)
        cells = " | ".join(
            f"{ari[:, r].mean():.2f} ({count[:, r].mean():.1f})" for r in range(len(RULES))
        )
        print(f"| {name} | {sum(sizes)} | {len(sizes)} | {cells} |")
    mean = " | ".join(f"{v / len(SETTINGS):.2f}" for v in totals)
    print(f"| mean ARI over settings | | | {mean} |")
    print(
        f"\n{args.seeds} seeds per setting; cells: mean ARI vs the planted groups (mean number "
        f"of clusters); {time.perf_counter() - t0:.1f} s"
    )


if __name__ == "__main__":
    main()
