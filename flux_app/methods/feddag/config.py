"""FedDAG's run-config section: every key starts with ``feddag-`` (docs/CONFIG.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from flux_app.engine.config import ConfigSection
from flux_app.engine.registry import register_config


@register_config
@dataclass(frozen=True)
class FeddagConfig(ConfigSection):
    """Warm-up, similarity, sweep, complementarity graph and variant of FedDAG."""

    prefix: ClassVar[str] = "feddag-"

    warmup_rounds: int = 2
    warmup_epochs: int = 10
    sketch_fraction: float = 0.02
    sketch_seed: int = 4321
    subspace_dim: int = 3
    similarity: str = "fused"
    delta: float = 0.5
    lambda_: float = 0.01
    alpha_step: float = 0.05
    #: "average" (UPGMA, the paper's words, our default) or "weighted" (WPGMA, the authors' code)
    linkage: str = "average"
    #: "stable" (longest run of alphas, our default) or "lowest-loss" (the paper's rule)
    alpha_pick: str = "stable"
    top_k: int = 2
    variant: str = "dual"
    schedule_k: int = 0

    def validate(self) -> None:  # noqa: D102
        self.choice("similarity", ("fused", "data", "gradient"))
        self.choice("variant", ("dual", "single", "dagger"))
        self.choice("linkage", ("average", "weighted"))
        self.choice("alpha_pick", ("stable", "lowest-loss"))
        self.check(0 < self.sketch_fraction <= 1, "sketch_fraction", "in (0, 1]")
        self.check(self.warmup_rounds >= 1, "warmup_rounds", ">= 1")
        self.check(self.warmup_epochs >= 1, "warmup_epochs", ">= 1")
        self.check(1 <= self.subspace_dim <= 64, "subspace_dim", "in 1..64")
        self.check(0 <= self.delta < 1, "delta", "in [0, 1)")
        self.check(0 <= self.lambda_ < math.inf, "lambda_", "a finite number >= 0")
        self.check(0 < self.alpha_step <= 1, "alpha_step", "in (0, 1]")
        self.check(self.top_k >= 1, "top_k", ">= 1")
        self.check(self.schedule_k >= 0, "schedule_k", ">= 0 (0 = every round)")
