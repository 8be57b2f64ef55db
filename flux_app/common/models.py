"""Models, each split into an ``encoder`` (input -> flat features) and a linear ``head``.

The split is what the methods need: FLUX describes the head's input features, FedDAG's dual model
puts two encoders in front of one head. ``build_model`` is the single place that maps a
run-config to a network.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class SplitModel(nn.Module):
    """``head(encoder(x))`` with the feature size known.

    Parameters
    ----------
    encoder : nn.Module
        Maps a batch of images to ``[batch, feature_dim]``.
    feature_dim : int
        Width of the encoder's output (the head's input).
    num_classes : int
        Number of logits.
    """

    def __init__(self, encoder: nn.Module, feature_dim: int, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(feature_dim, num_classes)
        self.feature_dim = feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened input of the classifier head."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.encoder(x))


def _flat_size(module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    with torch.no_grad():
        return int(module(torch.zeros(1, *input_shape)).flatten(1).shape[1])


def lenet5_encoder(
    input_shape: tuple[int, int, int], pool: type[nn.Module] = nn.AvgPool2d
) -> tuple[nn.Module, int]:
    """LeNet-5 feature extractor (FLUX): conv5x5(6, pad 2), pool, conv5x5(16), pool, FC 120, FC 84."""
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 6, 5, padding=2),
        nn.ReLU(),
        pool(2),
        nn.Conv2d(6, 16, 5),
        nn.ReLU(),
        pool(2),
        nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape)
    encoder = nn.Sequential(convs, nn.Linear(flat, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU())
    return encoder, 84


def feddag_cnn_encoder(input_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """FedDAG's encoders: LeNet-style (max-pool, 84-d) for 28x28 inputs; for 32x32 colour
    inputs three 3x3 convs (64/128/256, ReLU, max-pool) and FC 1024-128-256 (256-d)."""
    if input_shape[1] <= 28:
        return lenet5_encoder(input_shape, pool=nn.MaxPool2d)
    convs = nn.Sequential(
        nn.Conv2d(input_shape[0], 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(128, 256, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
    )
    flat = _flat_size(convs, input_shape)
    encoder = nn.Sequential(convs, nn.Linear(flat, 128), nn.ReLU(), nn.Linear(128, 256), nn.ReLU())
    return encoder, 256


def _conv_bn(cin: int, cout: int, pool: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class _Residual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(_conv_bn(channels, channels), _conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x + self.body(x)


def resnet9_encoder(input_shape: tuple[int, int, int]) -> tuple[nn.Module, int]:
    """ResNet-9 (prep 64, 128 + residual, 256, 512 + residual, global max-pool): 512-d."""
    encoder = nn.Sequential(
        _conv_bn(input_shape[0], 64),
        _conv_bn(64, 128, pool=True),
        _Residual(128),
        _conv_bn(128, 256, pool=True),
        _conv_bn(256, 512, pool=True),
        _Residual(512),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
    )
    return encoder, 512


ENCODERS = {"lenet5": lenet5_encoder, "cnn": feddag_cnn_encoder, "resnet9": resnet9_encoder}


class DualEncoderModel(nn.Module):
    """FedDAG's cluster model: primary and secondary encoders, one head on their concatenation.

    Parameters
    ----------
    primary, secondary : nn.Module
        Two encoders of the same architecture, each ``[batch, ...] -> [batch, feature_dim]``.
    feature_dim : int
        Output width of one encoder.
    num_classes : int
        Number of logits.
    """

    def __init__(
        self, primary: nn.Module, secondary: nn.Module, feature_dim: int, num_classes: int
    ) -> None:
        super().__init__()
        self.primary = primary
        self.secondary = secondary
        self.head = nn.Linear(2 * feature_dim, num_classes)
        self.feature_dim = 2 * feature_dim
        self.num_classes = num_classes

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated primary and secondary features (the head's input)."""
        return torch.cat([self.primary(x), self.secondary(x)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.head(self.features(x))


def build_model(
    name: str,
    input_shape: tuple[int, int, int],
    num_classes: int,
    *,
    dual: bool = False,
    seed: int | None = None,
) -> SplitModel | DualEncoderModel:
    """Build a model by run-config name.

    Parameters
    ----------
    name : str
        ``lenet5`` | ``cnn`` | ``resnet9``.
    input_shape : tuple[int, int, int]
        ``(channels, height, width)`` of one input.
    num_classes : int
        Number of logits.
    dual : bool
        Build FedDAG's dual-encoder model instead of a single encoder + head.
    seed : int, optional
        Seed the initial weights (every party that builds with the same seed gets the same net).
    """
    if name not in ENCODERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(ENCODERS)}")
    make = ENCODERS[name]
    # A private RNG scope: seeding must not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        encoder, dim = make(input_shape)
        if dual:
            secondary, _ = make(input_shape)
            return DualEncoderModel(encoder, secondary, dim, num_classes)
        return SplitModel(encoder, dim, num_classes)


def is_dual(state: Mapping[str, Any]) -> bool:
    """Whether a state dict is FedDAG's dual-encoder model (it has ``primary.*`` weights)."""
    return any(k.startswith("primary.") for k in state)
