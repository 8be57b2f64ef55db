"""FLUX's router, saved with the run: what placing a new client needs once the run is over.

``<run>/router/`` holds ``manifest.json`` (versions, model, input shape, classes, projection
settings, cluster ids), ``extractor.pt`` (the frozen extractor's state dict), ``normaliser.json``
(the fitted block scales), ``centroids.json`` (label-free centroids) and
``models/cluster_<k>.pt``. :class:`Router` loads it and routes a folder of images exactly as the
run routed a newcomer (label-free descriptor of its inputs, nearest centroid), offline, without
Flower; ``python -m flux_app.route`` is its command line. Everything is JSON or a
``weights_only`` state dict: loading a router runs no code from the files.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import flux_app
from flux_app.common.models import build_model
from flux_app.common.params import State
from flux_app.common.training import batches
from flux_app.methods.flux.clustering import BlockNormaliser, FluxClustering, route_many
from flux_app.methods.flux.descriptors import (
    compute_flux_descriptor,
    descriptor_features,
    projection_matrix,
)
from flux_app.methods.flux.fewshot import compute_class_sample, route_with_labels, select_labelled

FORMAT = 1


def save_router(
    folder: str,
    *,
    extractor: State,
    clustering: FluxClustering,
    models: dict[int, State],
    model_name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    proj_dim: int,
    proj_seed: int,
    dp_clip: float,
    class_names: list[str],
    strategy: str,
    descriptor_layer: str = "head-input",
) -> str:
    """Write ``folder`` (the run's ``router/``); returns its path."""
    os.makedirs(os.path.join(folder, "models"), exist_ok=True)
    torch.save(dict(extractor), os.path.join(folder, "extractor.pt"))
    for cid, state in models.items():
        torch.save(dict(state), os.path.join(folder, "models", f"cluster_{int(cid)}.pt"))
    with open(os.path.join(folder, "normaliser.json"), "w") as fh:
        json.dump(clustering.normaliser.to_dict(), fh)
    centroids = {"label_free": clustering.label_free_centroids.tolist()}
    if not clustering.normaliser.label_free and clustering.routing_scatter is not None:
        centroids["full"] = clustering.centroids.tolist()  # few-label routing's class blocks
        centroids["routing_scatter"] = np.asarray(clustering.routing_scatter).tolist()
    with open(os.path.join(folder, "centroids.json"), "w") as fh:
        json.dump(centroids, fh)
    manifest = {
        "format": FORMAT,
        "flux_app": flux_app.__version__,
        "torch": torch.__version__,
        "strategy": strategy,
        "model": model_name,
        "input_shape": list(input_shape),
        "num_classes": int(num_classes),
        "proj_dim": int(proj_dim),
        "proj_seed": int(proj_seed),
        "dp_clip": float(dp_clip),
        "descriptor_layer": descriptor_layer,
        "missing_penalty": float(clustering.missing_penalty),
        "clusters": sorted(int(c) for c in models),
        "class_names": list(class_names),
    }
    with open(os.path.join(folder, "manifest.json"), "w") as fh:
        json.dump(manifest, fh, indent=1)
    return folder


def save_router_of(strategy: Any, folder: str) -> str:
    """:func:`save_router` for a clustered FLUX strategy (extractor, clustering, models and the
    run-config's descriptor settings)."""
    shape, classes = strategy.cfg.model_input
    opts = strategy.opts
    return save_router(
        folder,
        extractor=strategy.extractor,
        clustering=strategy.result,
        models=strategy.models,
        model_name=strategy.cfg.model_name,
        input_shape=shape,
        num_classes=classes,
        proj_dim=opts.proj_dim,
        proj_seed=opts.proj_seed,
        dp_clip=opts.dp_clip,
        descriptor_layer=opts.descriptor_layer,
        class_names=strategy.cfg.class_name_list,
        strategy=strategy.name,
    )


@dataclass
class Router:
    """A saved FLUX router (see the module docstring)."""

    manifest: dict[str, Any]
    extractor: nn.Module
    clustering: FluxClustering
    folder: str

    @classmethod
    def load(cls, folder: str) -> Router:
        """Read ``<run>/router`` (or a run folder holding one)."""
        if os.path.isdir(os.path.join(folder, "router")):
            folder = os.path.join(folder, "router")
        path = os.path.join(folder, "manifest.json")
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"no router in {folder!r}: a FLUX run writes <run>/router/manifest.json"
            )
        with open(path) as fh:
            manifest = json.load(fh)
        if manifest.get("format") != FORMAT:
            raise ValueError(
                f"router format {manifest.get('format')!r}; this version reads {FORMAT}"
            )
        with open(os.path.join(folder, "normaliser.json")) as fh:
            normaliser = BlockNormaliser.from_dict(json.load(fh))
        with open(os.path.join(folder, "centroids.json")) as fh:
            saved = json.load(fh)
        centroids = np.asarray(saved["label_free"], dtype=np.float64)
        full = np.asarray(saved.get("full", centroids), dtype=np.float64)
        scatter = saved.get("routing_scatter")
        clustering = FluxClustering(
            labels=np.zeros(0, dtype=np.int64),
            num_clusters=len(centroids),
            centroids=full,
            label_free_centroids=centroids,
            normaliser=normaliser,
            missing_penalty=float(manifest["missing_penalty"]),
            routing_scatter=None if scatter is None else np.asarray(scatter, dtype=np.float64),
        )
        extractor = cls._model(manifest, os.path.join(folder, "extractor.pt"))
        return cls(manifest, extractor, clustering, folder)

    @staticmethod
    def _model(manifest: dict[str, Any], path: str) -> nn.Module:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model = build_model(
            manifest["model"],
            tuple(manifest["input_shape"]),
            int(manifest["num_classes"]),
            dual=any(k.startswith("primary.") for k in state),
        )
        model.load_state_dict(state)
        return model.eval()

    def route(
        self,
        x: torch.Tensor,
        labelled: tuple[torch.Tensor, torch.Tensor] | None = None,
        labels_per_class: int = 0,
    ) -> tuple[int, np.ndarray]:
        """Cluster of a client holding inputs ``x``, and its score for every cluster.

        Label-free (``labelled`` None or ``labels_per_class`` 0): the run's descriptor and
        nearest-centroid rule, scores = distances. With the client's labelled samples
        ``labelled = (x_l, y_l)`` and ``labels_per_class = k``: few-label routing on up to k of
        them per class (:func:`~flux_app.methods.flux.fewshot.route_with_labels`), scores =
        ``-2 log L``.
        """
        model = self.extractor
        features, width = descriptor_features(
            model, self.manifest.get("descriptor_layer", "head-input")
        )
        k = int(self.manifest["proj_dim"]) or min(int(self.manifest["num_classes"]), width)
        projection = projection_matrix(width, k, int(self.manifest["proj_seed"]))
        y = torch.zeros(len(x), dtype=torch.int64)
        with torch.no_grad():
            desc = compute_flux_descriptor(
                features,
                batches(x, y, 512),
                projection,
                int(self.manifest["num_classes"]),
                label_free=True,
                clip_norm=float(
                    self.manifest.get("dp_clip", 0.0)
                ),  # as the run; noise is not re-drawn
            )
        if labelled is not None and labels_per_class > 0 and len(labelled[1]):
            if self.clustering.routing_scatter is None:
                raise ValueError("this router was saved without few-label routing data")
            x_l, y_l = labelled
            idx = select_labelled(y_l, labels_per_class, seed=0)
            sample = compute_class_sample(
                features,
                x_l[idx],
                y_l[idx],
                projection,
                int(self.manifest["num_classes"]),
                clip_norm=float(self.manifest.get("dp_clip", 0.0)),
            )
            clusters, scores = route_with_labels([desc], [sample], self.clustering)
            return int(clusters[0]), scores[0]
        clusters, dist = route_many([desc], self.clustering)
        return int(clusters[0]), dist[0]

    def model(self, cluster: int) -> nn.Module:
        """The model of ``cluster``."""
        return self._model(
            self.manifest, os.path.join(self.folder, "models", f"cluster_{int(cluster)}.pt")
        )


__all__ = ["FORMAT", "Router", "save_router", "save_router_of"]
