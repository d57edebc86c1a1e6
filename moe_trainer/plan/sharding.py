"""Which optimizer state each rank holds under ``parallel.shard_optimizer`` (ZeRO-1), for the plan.

The very rule the ranks use (:mod:`moe_trainer.parallel.zero_owners`: whole tensors, largest
first to the least-loaded rank of a domain, dense then experts), over the same domains
(:func:`~moe_trainer.parallel.topology.shard_ranks`), so the plan's share is the rank's share.
Unsharded, and on disaggregated expert actors (the only holders of their experts), every rank
keeps the moments of every parameter it holds.
"""

from __future__ import annotations

from moe_trainer.config.schema import Config
from moe_trainer.moe.experts import is_expert_param
from moe_trainer.parallel.topology import shard_ranks
from moe_trainer.parallel.zero_owners import Domain, domain_owners
from moe_trainer.plan.ranks import ParamTensor

MOMENT_BYTES = 2 * 4  # AdamW's two fp32 moments per element: the sizes the ranks balance


def optimizer_numel(cfg: Config, params: tuple[ParamTensor, ...], rank: int, role: str) -> int:
    """Elements whose AdamW moments global rank ``rank`` (of role ``role``) holds."""
    if not cfg.parallel.shard_optimizer or role in ("single", "expert actor"):
        return sum(p.numel for p in params)
    sizes: tuple[dict[str, int], dict[str, int]] = ({}, {})
    for p in params:
        sizes[is_expert_param(p.name)][p.name] = MOMENT_BYTES * p.numel
    owners, _ = domain_owners([Domain(tuple(sorted(ranks)), None, part)
                               for ranks, part in zip(shard_ranks(cfg, rank), sizes, strict=True)])
    return sum(p.numel for p in params if owners[p.name] == rank)
