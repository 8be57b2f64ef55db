"""flux-app: clustered federated learning under distribution shift (FLUX, FedDAG and peers).

The library is importable without Flower running; ``server_app.py`` and ``client_app.py`` at the
repository root are the thin Flower components on top of it.
"""

__version__ = "0.1.0"
