"""The round loop of a clustered strategy: discovery, rounds, late nodes, the end of the run.

:func:`run_rounds` drives a :class:`~flux_app.engine.strategy.ClusteredStrategy` through its
hooks; it is the data flow of docs/ARCHITECTURE.md ("a round").
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any

from flux_app.common.seeding import derive_seed
from flux_app.engine import checkpoint, metrics
from flux_app.engine.delivery import deliver
from flux_app.engine.nodes import sample_nodes
from flux_app.engine.results import FINAL_DEFAULTS

if TYPE_CHECKING:  # pragma: no cover
    from flux_app.engine.strategy import ClusteredStrategy

logger = logging.getLogger("flwr")


def run_rounds(s: ClusteredStrategy, t_start: float) -> dict[str, Any]:
    """Set up (or restore a checkpoint: ``resume-from``), run the rounds up to
    ``num-server-rounds`` and finish (nodes already discovered by ``connect``); returns
    results.json's content."""
    done = 0
    if s.cfg.resume_from:
        folder = s.recorder.root if s.recorder is not None else checkpoint.resume_folder(s.cfg)
        done = checkpoint.restore(s, folder)
    else:
        s.setup()
    rounds = s.cfg.num_server_rounds
    for rnd in range(done + 1, rounds + 1):
        t0 = time.time()
        s.traffic_counter.start_round()
        s._transport().start_round()
        admit_new_nodes(s, rnd)
        s.phase = "train"
        s.before_round(rnd)
        s.train_losses = []
        s.train_round(rnd)
        accuracy = val_accuracy = None
        if rnd % s.cfg.eval_every == 0 or rnd == rounds:
            accuracy, val_accuracy = evaluate_round(s, rnd)
        row = {
            "round": rnd,
            "phase": s.phase,
            "num_clusters": len(set(s.assignment.values())),
            "train_loss": metrics.mean(s.train_losses),
            "accuracy": accuracy,
            "val_accuracy": val_accuracy,
            "bytes_up": s.traffic_counter.round["up"],
            "bytes_down": s.traffic_counter.round["down"],
            "seconds": round(time.time() - t0, 3),
            "nodes": round_nodes(s),
        }
        s.after_round(rnd, row)
        s.results["rounds"].append(row)
        if s.recorder is not None:
            s.recorder.add_round(row)
        logger.info(
            "[round %d/%d] phase=%s clusters=%d accuracy=%s seconds=%.1f nodes %d/%d answered",
            rnd,
            rounds,
            row["phase"],
            row["num_clusters"],
            "-" if accuracy is None else f"{accuracy:.4f}",
            row["seconds"],
            len(row["nodes"]["answered"]),
            len(row["nodes"]["asked"]),
        )
        every = s.cfg.checkpoint_every
        due = every > 0 and (rnd % every == 0 or rnd == rounds)
        if s.recorder is not None and due and s.checkpoint_ready(rnd):
            checkpoint.save(s, s.recorder.root, rnd)
    if s.trained == 0:
        errors = sorted(set(s._transport().errors.values()))
        raise RuntimeError(
            f"no node trained in {rounds} round(s): every train message went unanswered or was "
            "rejected"
            + (f"; node errors: {' | '.join(e[:300] for e in errors[:3])}" if errors else "")
        )
    return finish(s, time.time() - t_start)


def discover(s: ClusteredStrategy, wait_seconds: float = 120.0) -> None:
    """Wait for the nodes, admit them, and check that some node can train."""
    s.book.discover(s._transport(), s.cfg.min_nodes, wait_seconds)
    if not s.training_nodes():
        raise ValueError(
            f"holdout-clients={s.cfg.holdout_clients} leaves no node to train "
            f"({len(s.nodes)} nodes)"
        )
    logger.info(
        "%s: %d training node(s), %d held out",
        s.name,
        len(s.training_nodes()),
        len(s.holdout_nodes()),
    )


def admit_new_nodes(s: ClusteredStrategy, server_round: int) -> None:
    """Note who is connected; admit nodes that connect after the start. Held-out ones wait for
    the end; a node that comes back (same name, new id) keeps its cluster and state; others
    are routed to a cluster (hook ``route``) and train from this round on."""
    transport = s._transport()
    online = set(transport.grid.get_node_ids())
    transport.online = online
    new = s.book.unknown(online)
    if not new:
        return
    joined = s.book.query(transport, new, server_round, online)
    fresh = []
    for node_id in joined:
        twin = s.book.same_name(node_id)
        name = s.nodes[node_id].name
        if twin is not None:  # the namesake is offline (query rejects connected twins)
            checkpoint.rename_node(s, twin, node_id)
            logger.info("node %s (%s) is back as node %s", twin, name, node_id)
        elif name in s.book.departed and s.book.departed[name] in s.models:
            s.assignment[node_id] = s.book.departed.pop(name)
            logger.info("node %s (%s) is back -> cluster %s", node_id, name, s.assignment[node_id])
        elif not s.nodes[node_id].holdout:
            fresh.append(node_id)
    for node_id, cluster in s.route(fresh, server_round).items():
        if cluster is None:
            cluster = s.new_cluster_for(node_id)
        s.assignment[node_id] = cluster
        logger.info("node %s joined in round %d -> cluster %s", node_id, server_round, cluster)


def round_nodes(s: ClusteredStrategy) -> dict[str, list[str]]:
    """This round's nodes by name: asked (sent a message), answered (replied, valid or not),
    offline (known but not connected at the round's start), timed out (let a message of the
    round time out, so not waited for again in that round)."""
    transport = s._transport()
    log = transport.round_nodes
    online = transport.online
    offline = set(log["offline"]) | {n for n in s.nodes if online is not None and n not in online}

    def names(ids: set[int]) -> list[str]:
        return [s.nodes[n].name if n in s.nodes else f"#{n}" for n in s.ordered(ids)]

    return {
        "asked": names(log["asked"]),
        "answered": names(log["answered"]),
        "offline": names(offline),
        "timed_out": names(log["timed_out"]),
    }


def evaluate_round(s: ClusteredStrategy, rnd: int) -> tuple[float | None, float | None]:
    """Evaluate the assigned nodes (a ``fraction-evaluate`` sample, all in the last round) with
    their models; note each node's best accuracy."""
    nodes = s.ordered(s.assignment)
    fraction = s.cfg.fraction_evaluate
    if fraction < 1 and rnd < s.cfg.num_server_rounds and nodes:
        share = max(fraction, min(1.0, s.cfg.min_evaluate_nodes / len(nodes)))
        nodes = sample_nodes(nodes, share, derive_seed(s.cfg.seed, "sample-evaluate", rnd))
    s.last_eval = s.evaluate_nodes({n: s.model_for(n) for n in nodes}, rnd)
    accuracy = metrics.mean(m["accuracy"] for m in s.last_eval.values())
    val_accuracy = metrics.mean(m.get("val-accuracy") for m in s.last_eval.values())
    if s.counts_for_best(rnd):
        for n, m in s.last_eval.items():
            if m.get("accuracy") is not None:
                s.best_accuracy[n] = max(s.best_accuracy.get(n, 0.0), float(m["accuracy"]))
    return accuracy, val_accuracy


def finish(s: ClusteredStrategy, wall_seconds: float) -> dict[str, Any]:
    """Route and evaluate held-out nodes, compute final metrics, write checkpoints and plot."""
    end_round = s.cfg.num_server_rounds + 1
    holdouts = s.holdout_nodes()
    routed = s.route(holdouts, end_round) if holdouts else {}
    served_largest = []
    for n, c in routed.items():  # a site with only unlabeled data still gets a model
        if c is None and s.nodes[n].num_train == 0 and s.assignment:
            routed[n] = s.largest_cluster()
            served_largest.append(s.nodes[n].name)
            logger.warning(
                "%s cannot place node %s (%s) without labels; it is served the largest cluster",
                s.name,
                n,
                s.nodes[n].name,
            )
    usable = {n: c for n, c in routed.items() if c is not None and c in s.models}
    labelled = {n: c for n, c in usable.items() if s.nodes[n].num_test > 0}
    holdout_eval = s.evaluate_nodes({n: s.models[c] for n, c in labelled.items()}, end_round)
    ari, nmi = s.assignment_scores()

    def by_client(evals: dict[int, dict[str, float]]) -> dict[str, float]:
        return {
            s.nodes[n].name: float(evals[n]["accuracy"]) for n in s.ordered(evals) if n in s.nodes
        }

    final: dict[str, Any] = {
        **FINAL_DEFAULTS,
        "accuracy_known": metrics.mean(m["accuracy"] for m in s.last_eval.values()),
        # each client's best over the evaluated rounds (hook counts_for_best), averaged
        "accuracy_best_over_rounds": metrics.mean(s.best_accuracy.values()),
        "accuracy_holdout": metrics.mean(m["accuracy"] for m in holdout_eval.values())
        if holdouts
        else None,
        "num_clusters": len(set(s.assignment.values())),
        "ari": ari,
        "nmi": nmi,
        "routing_accuracy": metrics.routing_accuracy(s.nodes, s.assignment, usable)
        if holdouts
        else None,
        "served_largest": served_largest,
        "holdout_assignment": {s.nodes[n].name: c for n, c in routed.items()},
        "wall_seconds": round(wall_seconds, 3),
        "cluster_aggregator": s.aggregation.name,
        "excluded_nodes": {str(k): v for k, v in s.excluded.items()},
        # per partition id: what the unweighted means above are means of
        "accuracy_by_client": by_client(s.last_eval),
        "accuracy_holdout_by_client": by_client(holdout_eval),
    }
    own = s.final_metrics()
    final.update(own)
    # taken after final_metrics, so the closing test phase's messages count too; a strategy's
    # own figure (IFCA counts its score queries as model bytes) wins
    traffic = {
        "bytes_descriptor_up": s.traffic_counter.up(*s.descriptor_types),
        "bytes_model_up": s.traffic["train"]["up"],
        "bytes_model_down": s.traffic["train"]["down"],
    }
    final.update({k: v for k, v in traffic.items() if k not in own})
    run_name = (
        os.path.basename(s.recorder.root) if s.recorder is not None else (s.cfg.run_name or s.name)
    )
    final["delivered"] = deliver(s, {**s.assignment, **usable}, run_name, end_round + 1)
    s.results["final"] = final
    if s.recorder is not None:
        s.recorder.set("final", final)
        s.recorder.save_checkpoints(s.models)
        s.save_artifacts(s.recorder.root)
        s.recorder.plot()
        logger.info("results: %s", s.recorder.results_path)
    return s.results


__all__ = ["admit_new_nodes", "discover", "evaluate_round", "finish", "round_nodes", "run_rounds"]
