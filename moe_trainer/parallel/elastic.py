"""Elastic restarts: the layouts a run may continue with, and whether one fits what a cluster still holds.

No Ray here: the actor group asks the cluster for its nodes' resources and passes them in.
Every layout of a strategy trains the same objective from the same checkpoint (the global
batch, its order and the loss do not depend on the layout, and checkpoints reshard), so a run
that continues on fewer actors continues the same run; the layouts are tried largest first,
and each must pass the same validation as a layout the user typed and keep the run's
objective (``moe.group_sequences=null`` with capacity or expert choice ties the routing
groups to the layout: such a run has no smaller layout).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import TYPE_CHECKING

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.validate import validate
from moe_trainer.parallel.resources import rank_resources
from moe_trainer.parallel.topology import ep_size, world_size

if TYPE_CHECKING:
    from moe_trainer.config.schema import Config


def layout(cfg: Config) -> dict[str, int]:
    """The settings that make a layout (for restart events and messages)."""
    p = cfg.parallel
    if p.strategy == "disaggregated":
        return {"num_coordinators": p.num_coordinators, "num_expert_actors": p.num_expert_actors}
    return {"num_actors": p.num_actors, **({"ep_size": ep_size(cfg)} if p.strategy == "expert_parallel" else {})}


def describe_layout(cfg: Config) -> str:
    """``parallel.num_actors=4 parallel.ep_size=2``: the layout as the overrides that ask for it."""
    return " ".join(f"parallel.{key}={value}" for key, value in layout(cfg).items())


def _candidates(cfg: Config) -> Iterator[Config]:
    """Layouts of ``cfg``'s strategy no larger than it, largest (most ranks) first."""
    p = cfg.parallel
    if p.strategy == "disaggregated":
        pairs = [(c, x) for c in range(p.num_coordinators, 0, -1) for x in range(p.num_expert_actors, 0, -1)]
        for c, x in sorted(pairs, key=lambda cx: (cx[0] + cx[1], cx[1]), reverse=True):
            yield replace(cfg, parallel=replace(p, num_coordinators=c, num_expert_actors=x))
        return
    for n in range(p.num_actors, 0, -1):
        if p.strategy != "expert_parallel":
            yield replace(cfg, parallel=replace(p, num_actors=n))
            continue
        for ep in range(min(ep_size(cfg), n), 0, -1):  # the widest expert-parallel group first
            if n % ep == 0:
                yield replace(cfg, parallel=replace(p, num_actors=n, ep_size=None if ep == n else ep))


def _valid(candidate: Config, objective: dict[str, object]) -> bool:
    """Validation accepts it, and it optimises what the run optimised: with ``moe.group_sequences=null`` and
    capacity, expert choice or the group loss, the routing groups follow the layout, and a checkpoint of
    another objective is refused on load (so such a run has no smaller layout to continue with)."""
    from moe_trainer.engine import objective_signature

    try:
        validate(candidate)
    except ConfigError:
        return False
    return objective_signature(candidate) == objective


def valid_layouts(cfg: Config) -> list[Config]:
    """Every layout no larger than ``cfg``'s that may continue its run, largest first (``cfg``'s own first)."""
    from moe_trainer.engine import objective_signature

    objective = objective_signature(cfg)
    return [candidate for candidate in _candidates(cfg) if _valid(candidate, objective)]


def fits(cfg: Config, nodes: list[dict[str, float]]) -> bool:
    """Whether every rank's bundle fits the nodes' free resources (``[{"CPU": 2.0, "GPU": 0.0}, ...]``),
    first fit, largest bundles first (bundles of a job are few and of one or two sizes)."""
    bundles = sorted((rank_resources(cfg, rank) for rank in range(world_size(cfg))), reverse=True)
    free = [[node.get("CPU", 0.0), node.get("GPU", 0.0)] for node in nodes]
    for cpus, gpus in bundles:
        for room in free:
            if room[0] + 1e-9 >= cpus and room[1] + 1e-9 >= gpus:
                room[0] -= cpus
                room[1] -= gpus
                break
        else:
            return False
    return True


def largest_fitting(cfg: Config, nodes: list[dict[str, float]]) -> Config | None:
    """The largest valid layout of ``cfg``'s strategy, no larger than ``cfg``, that fits ``nodes`` (validated
    only once it fits: validation builds a memory plan)."""
    from moe_trainer.engine import objective_signature

    objective = objective_signature(cfg)
    return next((c for c in _candidates(cfg) if fits(c, nodes) and _valid(c, objective)), None)
