"""fesem: see README.md beside this file."""

from flux_app.methods.fesem.strategy import Fesem

__all__ = ["Fesem"]
