"""FLUX's run-config section: every key starts with ``flux-`` (docs/CONFIG.md explains each)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from flux_app.engine.config import ConfigSection
from flux_app.engine.registry import register_config


@register_config
@dataclass(frozen=True)
class FluxConfig(ConfigSection):
    """When FLUX clusters, how, and what its descriptors carry."""

    prefix: ClassVar[str] = "flux-"
    renamed: ClassVar[dict[str, str]] = {
        "cluster-round": "flux-cluster-round",
        "cluster-gain-threshold": "flux-cluster-gain-threshold",
        "cluster-min-round": "flux-cluster-min-round",
        "cluster-max-fraction": "flux-cluster-max-fraction",
    }

    cluster_round: int = 0
    cluster_gain_threshold: float = 0.06
    cluster_min_round: int = 3
    cluster_max_fraction: float = 0.8
    clusterer: str = "hdbscan"
    proj_dim: int = 0
    proj_seed: int = 1234
    min_cluster_size: int = 2
    noise_policy: str = "attach"
    attach_tolerance: float = 2.0
    iid_guard: bool = True
    missing_penalty: float = 1.0
    dp_clip: float = 0.0
    dp_noise: float = 0.0
    dp_mechanism: str = "gaussian"
    dp_delta: float = 1e-5
    #: draw descriptor noise from the run's seed (reproducible, NOT private against a server
    #: that knows the seed: for simulations); default: the node's OS entropy
    dp_seeded_noise: bool = False
    #: extra routing-labels values evaluated at the end (``"1,5,20"``): a column per k
    routing_labels_sweep: str = ""
    #: where descriptors read the extractor's features: "head-input" (LeNet-5: 84-d) or "conv"
    #: (the flattened conv stack, 400-d: the paper's layer)
    descriptor_layer: str = "head-input"
    #: re-describe the training nodes every r rounds after clustering and re-cluster when one
    #: changed (drift); 0 = never
    drift_check_every: int = 0

    def sweep(self) -> list[int]:
        """``routing-labels-sweep`` as integers (validated)."""
        text = self.routing_labels_sweep.strip()
        return [int(v) for v in text.split(",")] if text else []

    def validate(self) -> None:  # noqa: D102
        self.choice("clusterer", ("hdbscan", "knee-dbscan"))
        self.choice("noise_policy", ("attach", "singleton"))
        self.choice("dp_mechanism", ("gaussian", "laplace"))
        self.choice("descriptor_layer", ("head-input", "conv"))
        self.check(self.drift_check_every >= 0, "drift_check_every", ">= 0 (0 = never)")
        self.check(self.cluster_round >= 0, "cluster_round", ">= 0 (0 = automatic)")
        self.check(self.cluster_min_round >= 1, "cluster_min_round", ">= 1")
        self.check(0 < self.cluster_max_fraction <= 1, "cluster_max_fraction", "in (0, 1]")
        self.check(math.isfinite(self.cluster_gain_threshold), "cluster_gain_threshold", "finite")
        self.check(self.proj_dim >= 0, "proj_dim", ">= 0 (0 = number of classes)")
        self.check(self.min_cluster_size >= 2, "min_cluster_size", ">= 2")
        self.check(0 < self.attach_tolerance < math.inf, "attach_tolerance", "a finite number > 0")
        self.check(0 <= self.missing_penalty < math.inf, "missing_penalty", "a finite number >= 0")
        self.check(0 <= self.dp_clip < math.inf, "dp_clip", "a finite number >= 0")
        self.check(0 <= self.dp_noise < math.inf, "dp_noise", "a finite number >= 0")
        self.check(0 < self.dp_delta < 1, "dp_delta", "in (0, 1)")
        try:
            ks = self.sweep()
        except ValueError:
            ks = [-1]
        self.check(
            all(0 <= k <= 10_000 for k in ks),
            "routing_labels_sweep",
            'comma-separated integers in [0, 10000], e.g. "1,5,20"',
        )
        self.check(
            not (self.dp_noise > 0 and ks and max(ks) > 0),
            "routing_labels_sweep",
            "empty when flux-dp-noise > 0 (few-shot class moments are not noised)",
        )
        self.check(
            not (self.dp_noise > 0 and self.dp_clip <= 0),
            "dp_noise",
            "0 unless flux-dp-clip > 0 (the noise scale is calibrated to the clip norm)",
        )
