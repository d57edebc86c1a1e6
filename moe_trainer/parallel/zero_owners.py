"""Who owns which parameter's optimizer state under ``parallel.shard_optimizer``: pure arithmetic.

Apart from :mod:`moe_trainer.parallel.zero` (which broadcasts over process groups and imports
DeepSpeed's comm layer) so that the driver's memory plan (:mod:`moe_trainer.plan`) computes
each rank's share with the very rule the ranks use, without importing DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Domain:
    """Ranks holding identical copies of some parameters, and the group they broadcast over."""

    ranks: tuple[int, ...]  # global ranks, ascending
    group: Any  # their process group (None: the world)
    sizes: dict[str, int]  # parameter name -> bytes of its AdamW state, in model order


def assign_owners(sizes: dict[str, int], ranks: Sequence[int], loads: dict[int, int]) -> dict[str, int]:
    """Owner rank of each parameter: largest first, each to the least-loaded rank (ties: the lower rank).

    Graham's LPT rule (the largest share is at most 4/3 of the optimum); ``loads`` (bytes
    already owned per rank, from earlier domains) is updated in place, so dense and expert
    state balance together. Deterministic: every rank of a domain computes the same owners.
    """
    owners = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        rank = min(ranks, key=lambda r: (loads.get(r, 0), r))
        owners[name] = rank
        loads[rank] = loads.get(rank, 0) + sizes[name]
    return owners


def domain_owners(domains: Sequence[Domain]) -> tuple[dict[str, int], dict[int, int]]:
    """Owner of every parameter of ``domains`` and the state bytes each rank ends up owning.

    Dense first: the experts then fill the ranks it left lighter (``loads`` carries over).
    """
    loads: dict[int, int] = {}
    owners: dict[str, int] = {}
    for domain in domains:
        owners.update(assign_owners(domain.sizes, domain.ranks, loads))
    return owners, loads
