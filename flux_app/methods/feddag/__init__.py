"""FedDAG (Pramanik et al., ICLR 2026): see README.md beside this file."""

from flux_app.methods.feddag import client
from flux_app.methods.feddag.config import FeddagConfig
from flux_app.methods.feddag.strategy import FedDag

__all__ = ["FedDag", "FeddagConfig", "client"]
