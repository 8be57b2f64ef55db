"""CFL's run-config section: ``cfl-eps1``, ``cfl-eps2``, ``cfl-min-round`` (docs/CONFIG.md)."""

from __future__ import annotations

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
