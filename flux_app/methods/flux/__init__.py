"""FLUX (Fenoglio et al., NeurIPS 2025): see README.md beside this file."""

from flux_app.methods.flux import client
from flux_app.methods.flux.config import FluxConfig
from flux_app.methods.flux.kmeans import KMeansFlux
from flux_app.methods.flux.strategy import Flux

__all__ = ["Flux", "FluxConfig", "KMeansFlux", "client"]
