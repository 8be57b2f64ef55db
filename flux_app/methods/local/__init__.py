"""local: see README.md beside this file."""

from flux_app.methods.local.strategy import Local

__all__ = ["Local"]
