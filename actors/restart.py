"""The layout a Ray job restarts with after a loss: the configured one, a smaller one, or none.

See :mod:`moe_trainer.restarts` for the policy; this module asks the cluster what it still holds.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from actors.cluster import alive_nodes, wait_until_marked_dead
from actors.engine import request_for
from actors.group import NodeLost
from moe_trainer.config.schema import Config
from moe_trainer.engine import EngineLost
from moe_trainer.parallel.elastic import describe_layout, fits, largest_fitting


class CannotContinue(EngineLost):
    """The cluster no longer holds the job and no smaller layout may be used; checkpoints are intact."""


def _holds(nodes: dict[str, dict[str, float]]) -> str:
    cpus = sum(n["CPU"] for n in nodes.values())
    gpus = sum(n["GPU"] for n in nodes.values())
    plural = "s" if len(nodes) != 1 else ""
    return f"{len(nodes)} node{plural} with {cpus:g} CPUs" + (f", {gpus:g} GPUs" if gpus else "")


def _needs(cfg: Config) -> str:
    request = request_for(cfg)
    text = f"{request.actors} actors with {request.total('CPU'):g} CPUs"
    return text + (f", {request.total('GPU'):g} GPUs" if request.total("GPU") else "")


def _wait_until_it_fits(cfg: Config, wait_s: float) -> bool:
    """Up to ``wait_s`` for the alive nodes to hold ``cfg``'s ranks, node by node (an autoscaler's replacement)."""
    if wait_s <= 0:
        return False
    print(f"moe-train: waiting up to {wait_s:g} s (cluster.wait_for_resources_s) for the cluster to hold "
          f"{describe_layout(cfg)} again", file=sys.stderr, flush=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if fits(cfg, list(alive_nodes().values())):
            return True
        time.sleep(1.0)
    return False


def restart_layout(cfg: Config, err: EngineLost, run_dir: Path, checkpoint: Path | None) -> Config:
    """``cfg`` (the configured layout) when the cluster holds it, else the largest valid smaller one
    with ``fault_tolerance.elastic``; raises :class:`CannotContinue` otherwise.

    After a lost node, waits first until Ray counts it dead (its health checks), so the new
    placement group is not given the dead node's resources.
    """
    if isinstance(err, NodeLost):
        wait_until_marked_dead(err.node_ids, cfg.parallel.timeout_s)
    nodes = alive_nodes()
    if fits(cfg, list(nodes.values())):
        return cfg
    smaller = largest_fitting(cfg, list(nodes.values()))
    if cfg.fault_tolerance.elastic and smaller is not None:
        return smaller
    if not cfg.fault_tolerance.elastic and _wait_until_it_fits(cfg, cfg.cluster.wait_for_resources_s):
        return cfg
    nodes = alive_nodes()
    saved = (f"the last checkpoint, {checkpoint}, is intact" if checkpoint is not None
             else "no checkpoint was saved yet")
    resume = (f"Resume when the cluster holds the job again: the same command with train.resume=auto "
              f"hydra.run.dir={run_dir}")
    if cfg.fault_tolerance.elastic:
        fix = f"{resume} (no layout of {cfg.parallel.strategy} fits what is left)"
    else:
        on_what_is_left = (f"fault_tolerance.elastic=true (it would continue with {describe_layout(smaller)})"
                           if smaller is not None else "a smaller layout")
        fix = f"{resume}, or continue on what is left with {on_what_is_left}"
    raise CannotContinue(f"{err}. The cluster now holds {_holds(nodes)}; {describe_layout(cfg)} needs "
                         f"{_needs(cfg)}, so the job cannot restart; stopping: {saved}. {fix}.")
