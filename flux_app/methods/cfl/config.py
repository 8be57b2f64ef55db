"""CFL's run-config section: ``cfl-eps1``, ``cfl-eps2``, ``cfl-min-round`` (docs/CONFIG.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from flux_app.engine.config import ConfigSection
from flux_app.engine.registry import register_config


@register_config
@dataclass(frozen=True)
class CflConfig(ConfigSection):
    """CFL's split criterion: mean update norm < eps1, max update norm > eps2."""

    prefix: ClassVar[str] = "cfl-"

    eps1: float = 0.4
    eps2: float = 1.6
    min_round: int = 20

    def validate(self) -> None:  # noqa: D102
        self.check(0 <= self.eps1 < math.inf, "eps1", "a finite number >= 0")
        self.check(0 <= self.eps2 < math.inf, "eps2", "a finite number >= 0")
        self.check(self.min_round >= 1, "min_round", ">= 1")
