"""Who holds which experts and who talks to whom: pure arithmetic, no processes.

``world`` data-parallel ranks are cut into expert-parallel (EP) groups of
``ep_size`` consecutive ranks; inside one EP group every expert lives on exactly
one rank. Ranks with the same position in different EP groups hold the same
experts and form an expert-data-parallel (EDP) group, over which those experts'
gradients are reduced. ``ep_size=1`` is plain data parallelism.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from moe_trainer.config.schema import Config


def world_size(cfg: Config) -> int:
    """Ranks (Ray actors) of a strategy. Here, not in ``setup``, so the driver can size its actor
    group without importing DeepSpeed, which only the ranks need."""
    p = cfg.parallel
    return p.num_coordinators + p.num_expert_actors if p.strategy == "disaggregated" else p.num_actors


def ep_size(cfg: Config) -> int:
    """Expert-parallel size: 1 for data_parallel, ``parallel.ep_size`` or all actors for expert_parallel."""
    if cfg.parallel.strategy == "expert_parallel":
        return cfg.parallel.ep_size if cfg.parallel.ep_size is not None else cfg.parallel.num_actors
    return 1


def shard_ranks(cfg: Config, rank: int) -> tuple[list[int], list[int]]:
    """``parallel.shard_optimizer``'s two domains for ``rank``: the ranks sharing its dense parameters,
    and those sharing its experts (its expert-data-parallel group; a disaggregated coordinator's
    experts are the expert actors', so only its own rank)."""
    p = cfg.parallel
    if p.strategy == "disaggregated":
        return list(range(p.num_coordinators)), [rank]
    topo = Topology(rank=rank, world=world_size(cfg), ep_size=ep_size(cfg), num_experts=cfg.moe.num_experts)
    return list(range(topo.world)), list(topo.edp_groups()[topo.ep_rank])


@dataclass(frozen=True)
class Topology:
    rank: int  # global rank
    world: int  # data-parallel ranks (every rank trains on its own rows)
    ep_size: int  # ranks sharing one copy of the experts
    num_experts: int  # global experts per MoE layer

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    @property
    def experts_per_rank(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def expert_range(self) -> tuple[int, int]:
        """``(first global expert, count)`` held by this rank."""
        return self.ep_rank * self.experts_per_rank, self.experts_per_rank

    def ep_groups(self) -> list[list[int]]:
        return [list(range(start, start + self.ep_size)) for start in range(0, self.world, self.ep_size)]

    def edp_groups(self) -> list[list[int]]:
        return [list(range(position, self.world, self.ep_size)) for position in range(self.ep_size)]
