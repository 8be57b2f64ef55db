"""ifca: see README.md beside this file."""

from flux_app.methods.ifca.strategy import Ifca

__all__ = ["Ifca"]
