"""PACFL's run-config section: ``pacfl-threshold``, ``pacfl-subspace-dim`` (docs/CONFIG.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from flux_app.engine.config import ConfigSection
from flux_app.engine.registry import register_config


@register_config
@dataclass(frozen=True)
class PacflConfig(ConfigSection):
    """PACFL's merge threshold (degrees; 0 = the largest-gap rule) and subspace dimension."""

    prefix: ClassVar[str] = "pacfl-"

    threshold: float = 0.0
    subspace_dim: int = 3

    def validate(self) -> None:  # noqa: D102
        self.check(0 <= self.threshold <= 90, "threshold", "in [0, 90] degrees (0 = automatic)")
        self.check(1 <= self.subspace_dim <= 64, "subspace_dim", "in 1..64")
