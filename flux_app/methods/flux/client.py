"""Client side of FLUX: the ``query.descriptor`` action.

The server sends the frozen extractor (the global model of the clustering round) and a
ConfigRecord ``config`` with:

``label-free``  bool, only the marginal moments (routing of unlabeled clients)
``split``       ``train`` (the clustering descriptor), ``val`` (the same on the validation
                split: the server measures the descriptors' noise on train/val pairs) or
                ``test`` (data met at test time)
``proj-dim``    K, rows of the shared-seed projection (0 = number of classes)
``proj-seed``   the seed every party uses for the projection
``dp-clip``, ``dp-noise``, ``dp-mechanism``, ``dp-seeded-noise``  optional privacy (see
                :func:`flux_app.methods.flux.descriptors.privatize` for the sensitivity bound)
``layer``       ``head-input`` (default) or ``conv`` (:func:`descriptor_features`)
``with-val``    (only with a full ``train`` descriptor) also send the descriptor of the
                validation split, ArrayRecord ``descriptor-val`` (omitted when the split is
                empty): the clustering round's noise check, without a second message
``routing-labels``  k > 0 (only with ``label-free`` and ``split=test``): also send the class
                moments of up to k labelled test samples per class (few-label routing,
                :mod:`flux_app.methods.flux.fewshot`); never with descriptor noise

and gets back ArrayRecord ``descriptor`` (the arrays of :class:`FluxDescriptor`) and, with
``routing-labels``, ArrayRecord ``labelled`` (the arrays of
:class:`~flux_app.methods.flux.fewshot.ClassSample`).
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import RecordDict

from flux_app.common.records import arrays_to_record
from flux_app.common.training import batches
from flux_app.engine.client import ClientRuntime, config_of
from flux_app.engine.registry import register_query
from flux_app.methods.flux.descriptors import (
    FluxDescriptor,
    compute_flux_descriptor,
    descriptor_features,
    privatize,
    projection_matrix,
)
from flux_app.methods.flux.fewshot import compute_class_sample, select_labelled


@register_query("descriptor")
def handle_descriptor(content: RecordDict, rt: ClientRuntime) -> RecordDict:
    """Compute this node's FLUX descriptor with the received extractor."""
    config = config_of(content)
    label_free = bool(config.get("label-free", False))
    split = str(config.get("split", "train"))
    if split not in ("train", "val", "test"):
        raise ValueError(f"descriptor split must be train, val or test, not {split!r}")
    with_val = bool(config.get("with-val", False))
    if with_val and (split != "train" or label_free):
        raise ValueError("with-val applies to a full train-split descriptor only")
    model = rt.model_from(content)
    device = rt.device
    model.to(device).eval()
    d = rt.data
    # K defaults to the number of classes, capped at the feature width (CIFAR-100 on LeNet-5).
    features, width = descriptor_features(model, str(config.get("layer", "head-input")))
    k = int(config.get("proj-dim", 0)) or min(d.num_classes, width)
    projection = projection_matrix(width, k, int(config.get("proj-seed", 0)))
    clip = float(config.get("dp-clip", 0.0))
    noise = float(config.get("dp-noise", 0.0))

    def describe(split: str) -> FluxDescriptor:
        x, y = {
            "train": (d.x_train, d.y_train),
            "val": (d.x_val, d.y_val),
            "test": (d.x_test, d.y_test),
        }[split]
        if split == "test" and label_free and not len(x):  # a site with only unlabeled inputs
            x = rt.unlabeled
            y = torch.zeros(len(x), dtype=torch.int64)  # unused: the label-free moments only
        if not len(x):
            raise ValueError(f"no {split} data for a descriptor")
        desc = compute_flux_descriptor(
            lambda xb: features(xb.to(device)),
            batches(x, y, 512),
            projection,
            d.num_classes,
            label_free=label_free,
            clip_norm=clip,
        )
        if noise > 0:
            if bool(config.get("dp-seeded-noise", False)):  # reproducible simulations only
                rng = np.random.default_rng(
                    rt.seed_for("dp", int(config.get("server-round", 0)), split)
                )
            else:  # fresh OS entropy: nobody who knows the run's seed can subtract the noise
                rng = np.random.default_rng()
            desc = privatize(desc, clip, noise, str(config.get("dp-mechanism", "gaussian")), rng)
        return desc

    desc = describe(split)
    reply = {"descriptor": arrays_to_record(desc.to_arrays())}
    if with_val and len(d.x_val):  # the noise check's pair, in the same message
        reply["descriptor-val"] = arrays_to_record(describe("val").to_arrays())
    labels = int(config.get("routing-labels", 0))
    if labels > 0:
        if not (label_free and split == "test"):
            raise ValueError("routing-labels applies to a label-free test-split descriptor only")
        if noise > 0:
            raise ValueError(
                "routing-labels with descriptor noise: few-shot moments are not noised"
            )
        if len(d.y_test):  # a site with only unlabeled inputs has no labelled sample to give
            idx = select_labelled(d.y_test, labels, rt.seed_for("routing-labels"))
            sample = compute_class_sample(
                lambda xb: features(xb.to(device)),
                d.x_test[idx],
                d.y_test[idx],
                projection,
                d.num_classes,
                clip_norm=clip,
            )
            reply["labelled"] = arrays_to_record(sample.to_arrays())
    return RecordDict(reply)
