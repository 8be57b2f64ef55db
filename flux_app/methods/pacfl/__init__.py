"""PACFL (Vahidian et al.): see README.md beside this file."""

from flux_app.methods.pacfl import client
from flux_app.methods.pacfl.config import PacflConfig
from flux_app.methods.pacfl.strategy import Pacfl

__all__ = ["Pacfl", "PacflConfig", "client"]
