"""CFL (Sattler et al.): see README.md beside this file."""

from flux_app.methods.cfl.config import CflConfig
from flux_app.methods.cfl.strategy import Cfl

__all__ = ["Cfl", "CflConfig"]
