"""fedavg: see README.md beside this file."""

from flux_app.methods.fedavg.strategy import FedAvg

__all__ = ["FedAvg"]
