"""What each rank reserves from Ray (CPUs, GPUs): one answer that every consumer reads.

The disaggregated strategy's two roles do different work: coordinators run embeddings,
attention, routers and the LM head over every token, expert actors only the expert FFNs.
So each role is sized on its own (``parallel.cpus_per_coordinator``,
``parallel.gpus_per_expert_actor``, ...); a role left unset takes ``parallel.cpus_per_actor``
/ ``parallel.gpus_per_actor``, as every actor of the other strategies does. The cluster
capacity check, the placement-group bundles and actor options, the start-up line, a rank's
torch threads, its device and backend, and actor reuse all read these functions, so they
cannot disagree about what a rank holds.

No torch and no Ray here: the driver sizes its actor group before importing either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moe_trainer.parallel.topology import world_size

if TYPE_CHECKING:
    from moe_trainer.config.schema import Config

# The per-role settings and the role each sizes; only the disaggregated strategy reads them.
ROLE_SETTINGS = ("parallel.cpus_per_coordinator", "parallel.gpus_per_coordinator",
                 "parallel.cpus_per_expert_actor", "parallel.gpus_per_expert_actor")


@dataclass(frozen=True)
class RoleResources:
    """What every actor of one role reserves, and which settings the values came from (for messages)."""

    role: str  # what one actor of the role is called: "actor", "coordinator" or "expert actor"
    actors: int  # actors of this role; ranks are consecutive, in the order role_resources returns roles
    cpus: float  # CPUs each actor reserves
    gpus: float  # GPUs each actor reserves: 0 (CPU, gloo) or 1 (NCCL), see config.validate
    cpus_setting: str  # the setting `cpus` came from: a per-role one when the user set it, else cpus_per_actor
    gpus_setting: str  # likewise for `gpus`
    count_setting: str  # the setting `actors` came from: parallel.num_actors, num_coordinators or num_expert_actors

    def count(self) -> str:
        """``"1 coordinator"``, ``"2 expert actors"``: the role with its number, for messages."""
        return f"{self.actors} {self.role}{'' if self.actors == 1 else 's'}"

    def reserves(self, resource: str) -> tuple[float, str]:
        """Each actor's amount of Ray resource ``"CPU"`` or ``"GPU"``, and the setting it came from."""
        return (self.gpus, self.gpus_setting) if resource == "GPU" else (self.cpus, self.cpus_setting)


def _role(cfg: Config, role: str, actors: int, key: str) -> RoleResources:
    """A disaggregated role sized by ``parallel.{cpus,gpus}_per_<key>``, falling back per value."""
    p = cfg.parallel
    cpus, gpus = getattr(p, f"cpus_per_{key}"), getattr(p, f"gpus_per_{key}")
    return RoleResources(
        role, actors,
        cpus=p.cpus_per_actor if cpus is None else cpus,
        gpus=p.gpus_per_actor if gpus is None else gpus,
        cpus_setting="parallel.cpus_per_actor" if cpus is None else f"parallel.cpus_per_{key}",
        gpus_setting="parallel.gpus_per_actor" if gpus is None else f"parallel.gpus_per_{key}",
        count_setting=f"parallel.num_{key}s",
    )


def role_resources(cfg: Config) -> tuple[RoleResources, ...]:
    """The roles in rank order: disaggregated coordinators (ranks 0..C-1), then its expert actors
    (C..C+X-1); every other strategy has one role, ``actor``, of ``world_size`` ranks."""
    p = cfg.parallel
    if p.strategy != "disaggregated":
        return (RoleResources("actor", world_size(cfg), p.cpus_per_actor, p.gpus_per_actor,
                              "parallel.cpus_per_actor", "parallel.gpus_per_actor", "parallel.num_actors"),)
    return (_role(cfg, "coordinator", p.num_coordinators, "coordinator"),
            _role(cfg, "expert actor", p.num_expert_actors, "expert_actor"))


def rank_role(cfg: Config, rank: int) -> RoleResources:
    """The role (and so the resources) of global rank ``rank``."""
    first = 0
    for role in role_resources(cfg):
        if rank < first + role.actors:
            return role
        first += role.actors
    raise ValueError(f"rank {rank} is outside the {world_size(cfg)} ranks of parallel.strategy={cfg.parallel.strategy}")


def rank_resources(cfg: Config, rank: int) -> tuple[float, float]:
    """``(cpus, gpus)`` that rank ``rank`` reserves from Ray."""
    role = rank_role(cfg, rank)
    return role.cpus, role.gpus


def torch_threads(cpus: float) -> int:
    """Intra-op threads for a rank holding ``cpus`` CPUs: as many as it reserved, so actors sharing a
    node do not oversubscribe its cores; at least one, since a fraction of a CPU still computes."""
    return max(1, int(cpus))
