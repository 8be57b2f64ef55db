"""How a cluster combines its members' updates: run-config ``cluster-aggregator``.

Every method (FLUX, FedDAG, IFCA, ...) decides WHO is in a cluster; the aggregator decides HOW a
cluster's trained models become its next model. Any method combines with any aggregator.

``fedavg`` (default)
    Sample-weighted mean in float64 (:func:`~flux_app.common.params.weighted_average`): the
    numbers every benchmark of this app was run with. Flower's FedAvg computes the same mean in
    the models' float32, which differs in the last bits.
Flower's own Message-API strategies (``flwr.serverapp.strategy``), one instance per cluster so
their state (FedAdam's moments, ...) is per cluster:
    ``fedprox`` (FedAvg on the server, the proximal term ``aggregator-proximal-mu`` on the
    client), ``fedadam`` / ``fedyogi`` / ``fedadagrad`` (server optimisers, ``aggregator-eta``,
    ``aggregator-tau``), ``fedavgm`` (server momentum), ``fedmedian``, ``fedtrimmedavg``
    (``aggregator-trim-beta``), ``krum`` / ``multikrum`` / ``bulyan``
    (``aggregator-num-malicious``, ``aggregator-num-selected``).

Only validated models reach an aggregator (the engine checks every reply first); their weight is
the reply's ``num-examples``. A robust rule that cannot run on a cluster's replies (Bulyan needs
``n >= 4f + 3``, a trim that would cut everything) falls back, logged, to the coordinate-wise
median of the same replies, never to the plain mean. Integer buffers (BatchNorm counters) take
the members' maximum, as in ``fedavg``; floating tensors keep the cluster model's dtype.

A plug-in adds an aggregator with ``@register_aggregator("name")`` on a class taking the run's
config and providing ``aggregate(server_round, current, states, weights)``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.serverapp import strategy as flwr_strategy
from flwr.serverapp.exception import AggregationError

from flux_app.common.params import State, weighted_average
from flux_app.common.records import from_record, to_record
from flux_app.engine.config import ConfigSection
from flux_app.engine.registry import AGGREGATORS, register_aggregator, register_config

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.config import RunConfig

logger = logging.getLogger("flwr")


@register_config
@dataclass(frozen=True)
class AggregatorConfig(ConfigSection):
    """Settings of the ``cluster-aggregator`` choices (0 = Flower's default where noted)."""

    prefix: ClassVar[str] = "aggregator-"
    #: FedProx: weight of the client-side proximal term mu/2 ||w - w_cluster||^2
    proximal_mu: float = 0.01
    #: FedAdam / FedYogi / FedAdagrad / FedAvgM: server learning rate (0 = Flower's default)
    eta: float = 0.0
    #: FedAdam / FedYogi / FedAdagrad: adaptivity (0 = Flower's default)
    tau: float = 0.0
    #: FedTrimmedAvg: fraction cut at each end per coordinate
    trim_beta: float = 0.2
    #: Krum / MultiKrum / Bulyan: Byzantine members tolerated per cluster
    num_malicious: int = 0
    #: MultiKrum: members averaged (0 = replies - num-malicious)
    num_selected: int = 0

    def validate(self) -> None:  # noqa: D102
        self.check(self.proximal_mu >= 0, "proximal_mu", ">= 0")
        self.check(self.eta >= 0, "eta", ">= 0 (0 = Flower's default)")
        self.check(self.tau >= 0, "tau", ">= 0 (0 = Flower's default)")
        self.check(0 <= self.trim_beta < 0.5, "trim_beta", "in [0, 0.5)")
        self.check(self.num_malicious >= 0, "num_malicious", ">= 0")
        self.check(self.num_selected >= 0, "num_selected", ">= 0")


@register_aggregator("fedavg")
class WeightedMean:
    """Sample-weighted mean in float64: this app's FedAvg."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg

    def client_config(self) -> dict[str, Any]:
        """Extra train-message config for the clients (none)."""
        return {}

    def aggregate(
        self, server_round: int, current: State | None, states: list[State], weights: list[float]
    ) -> State:
        """The weighted mean of ``states``."""
        return weighted_average(states, weights)


class FlowerAggregator:
    """One of Flower's Message-API strategies used for its ``aggregate_train`` only.

    Subclasses name the Flower class (``flower``) and its keyword arguments (``options``).
    """

    flower: ClassVar[str] = ""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.opts = cfg.section(AggregatorConfig)
        kwargs = {k: v for k, v in self.options().items() if v is not None}
        self.strategy = getattr(flwr_strategy, self.flower)(**kwargs)

    def options(self) -> dict[str, Any]:
        """Keyword arguments of the Flower strategy (``None`` = Flower's default)."""
        return {}

    def client_config(self) -> dict[str, Any]:
        """Extra train-message config for the clients (FedProx: the proximal term)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """What carries over rounds: the server optimisers' moments (for checkpoints)."""
        return {a: v for a in _CARRIED if (v := getattr(self.strategy, a, None)) is not None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s moments."""
        for attr, value in state.items():
            if attr in _CARRIED:
                setattr(self.strategy, attr, value)

    def prepare(self, num_replies: int) -> None:
        """Adjust per-call settings before aggregating ``num_replies`` models."""

    def aggregate(
        self, server_round: int, current: State | None, states: list[State], weights: list[float]
    ) -> State:
        """Flower's aggregate of the validated ``states``; dtypes as the cluster model's."""
        reference = current if current is not None else states[0]
        if hasattr(self.strategy, "current_arrays"):  # server optimisers: what was sent
            self.strategy.current_arrays = {k: v.numpy() for k, v in to_record(reference).items()}
        self.prepare(len(states))
        try:
            arrays = self._flower_aggregate(self.strategy, server_round, states, weights)
        except (AggregationError, ValueError, IndexError) as err:
            logger.warning(
                "cluster-aggregator %s cannot combine %d update(s) (%s); using their "
                "coordinate-wise median",
                self.cfg.cluster_aggregator,
                len(states),
                err,
            )
            arrays = self._flower_aggregate(
                flwr_strategy.FedMedian(), server_round, states, weights
            )
        if arrays is None:  # Flower skipped (e.g. Bulyan with too few replies): still robust
            logger.warning(
                "cluster-aggregator %s skipped %d update(s); using their coordinate-wise median",
                self.cfg.cluster_aggregator,
                len(states),
            )
            arrays = self._flower_aggregate(
                flwr_strategy.FedMedian(), server_round, states, weights
            )
        return _like(reference, from_record(arrays), states)

    @staticmethod
    def _flower_aggregate(
        strategy: Any, server_round: int, states: list[State], weights: list[float]
    ) -> Any:
        replies = [
            Message(
                RecordDict(
                    {"arrays": to_record(s), "metrics": MetricRecord({"num-examples": float(w)})}
                ),
                dst_node_id=0,
                message_type="train",
            )
            for s, w in zip(states, weights, strict=True)
        ]
        arrays, _ = strategy.aggregate_train(server_round, replies)
        return arrays


#: attributes of Flower's strategies that carry over rounds (FedOpt's moments, FedAvgM's momentum)
_CARRIED = ("m_t", "v_t", "momentum_vector")


def _like(reference: State, got: State, states: list[State]) -> State:
    """Cast Flower's arrays back to the reference's dtypes; integer buffers take the maximum."""
    out: State = OrderedDict()
    for key, ref in reference.items():
        if ref.is_floating_point():
            out[key] = got[key].to(ref.dtype).reshape(ref.shape).clone()
        else:
            out[key] = torch.stack([s[key] for s in states]).max(dim=0).values
    return out


@register_aggregator("fedprox")
class FedProxAggregator(FlowerAggregator):
    """Flower's FedProx: FedAvg on the server, the proximal term on the clients."""

    flower = "FedProx"

    def options(self) -> dict[str, Any]:  # noqa: D102
        return {"proximal_mu": self.opts.proximal_mu}

    def client_config(self) -> dict[str, Any]:  # noqa: D102
        return {"proximal-mu": self.opts.proximal_mu}


class _ServerOptimiser(FlowerAggregator):
    def options(self) -> dict[str, Any]:
        return {"eta": self.opts.eta or None, "tau": self.opts.tau or None}


@register_aggregator("fedadam")
class FedAdamAggregator(_ServerOptimiser):
    """Flower's FedAdam (moments kept per cluster)."""

    flower = "FedAdam"


@register_aggregator("fedyogi")
class FedYogiAggregator(_ServerOptimiser):
    """Flower's FedYogi (moments kept per cluster)."""

    flower = "FedYogi"


@register_aggregator("fedadagrad")
class FedAdagradAggregator(_ServerOptimiser):
    """Flower's FedAdagrad (accumulator kept per cluster)."""

    flower = "FedAdagrad"


@register_aggregator("fedavgm")
class FedAvgMAggregator(FlowerAggregator):
    """Flower's FedAvgM (server momentum kept per cluster)."""

    flower = "FedAvgM"

    def options(self) -> dict[str, Any]:  # noqa: D102
        return {"server_learning_rate": self.opts.eta or None}


@register_aggregator("fedmedian")
class FedMedianAggregator(FlowerAggregator):
    """Flower's FedMedian: the coordinate-wise median."""

    flower = "FedMedian"


@register_aggregator("fedtrimmedavg")
class FedTrimmedAvgAggregator(FlowerAggregator):
    """Flower's FedTrimmedAvg: per coordinate, the mean after cutting ``trim-beta`` each end."""

    flower = "FedTrimmedAvg"

    def options(self) -> dict[str, Any]:  # noqa: D102
        return {"beta": self.opts.trim_beta}


@register_aggregator("krum")
class KrumAggregator(FlowerAggregator):
    """Flower's Krum: the update closest to its n - f - 2 nearest neighbours."""

    flower = "Krum"

    def options(self) -> dict[str, Any]:  # noqa: D102
        return {"num_malicious_nodes": self.opts.num_malicious}


@register_aggregator("multikrum")
class MultiKrumAggregator(KrumAggregator):
    """Flower's MultiKrum: the mean of the ``num-selected`` best Krum scores."""

    flower = "MultiKrum"

    def prepare(self, num_replies: int) -> None:  # noqa: D102
        k = self.opts.num_selected or num_replies - self.opts.num_malicious
        self.strategy.num_nodes_to_select = max(1, min(k, num_replies))


@register_aggregator("bulyan")
class BulyanAggregator(KrumAggregator):
    """Flower's Bulyan: Krum selection, then a trimmed mean (needs n >= 4f + 3)."""

    flower = "Bulyan"


class ClusterAggregation:
    """One aggregator per cluster, built on first use from the run's ``cluster-aggregator``.

    Parameters
    ----------
    cfg : RunConfig
        The run's configuration.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.name = cfg.cluster_aggregator
        self.cfg = cfg
        self._factory = AGGREGATORS[self.name]
        self._per_cluster: dict[int, Any] = {}
        self._client_config = self._factory(cfg).client_config()

    def client_config(self) -> dict[str, Any]:
        """What every train message must carry for this aggregator (FedProx's mu)."""
        return dict(self._client_config)

    def combine(
        self,
        cluster: int,
        current: State | None,
        states: list[State],
        weights: list[float],
        server_round: int,
    ) -> State:
        """The new model of ``cluster`` from its members' validated ``states``."""
        if not states:
            raise ValueError("nothing to aggregate")
        agg = self._per_cluster.get(cluster)
        if agg is None:
            agg = self._per_cluster[cluster] = self._factory(self.cfg)
        return agg.aggregate(server_round, current, list(states), [float(w) for w in weights])

    def reset(self) -> None:
        """Forget every cluster's aggregator state (call when clusters are formed anew)."""
        self._per_cluster.clear()

    def state_dict(self) -> dict[int, dict[str, Any]]:
        """Each cluster's aggregator state (for checkpoints); stateless rules give ``{}``."""
        out = {}
        for cid, agg in self._per_cluster.items():
            keep = getattr(agg, "state_dict", None)
            out[cid] = keep() if keep is not None else {}
        return out

    def load_state_dict(self, state: dict[int, dict[str, Any]]) -> None:
        """Rebuild the per-cluster aggregators from :meth:`state_dict`."""
        self._per_cluster.clear()
        for cid, agg_state in state.items():
            agg = self._per_cluster[int(cid)] = self._factory(self.cfg)
            if agg_state:
                agg.load_state_dict(agg_state)


__all__ = ["AggregatorConfig", "ClusterAggregation", "FlowerAggregator", "WeightedMean"]
