"""oracle: see README.md beside this file."""

from flux_app.methods.oracle.strategy import Oracle

__all__ = ["Oracle"]
