"""Which optimizer state each rank holds under ``parallel.shard_optimizer`` (ZeRO-1), for the plan.

Read with ``getattr`` so the plan works with and without that setting in the schema. Sharded:
AdamW's moments of the dense parameters are owned by one data-parallel rank each, tensors
given out largest first to the rank holding the fewest elements so far (ZeRO-1, Rajbhandari
et al., https://arxiv.org/abs/1910.02054); expert tensors the same way over their
expert-data-parallel group (the ranks holding replicas of the same experts). Unsharded: every
rank keeps the moments of every parameter it holds.
"""

from __future__ import annotations

from moe_trainer.config.schema import Config
from moe_trainer.plan.ranks import ParamTensor


def shards_optimizer(cfg: Config) -> bool:
    return bool(getattr(cfg.parallel, "shard_optimizer", False))


def greedy_owners(sizes: list[int], owners: int) -> list[int]:
    """Elements each of ``owners`` ranks owns when tensors of ``sizes`` go largest first to the emptiest rank."""
    held = [0] * owners
    for size in sorted(sizes, reverse=True):
        held[held.index(min(held))] += size
    return held


def optimizer_numel(cfg: Config, params: tuple[ParamTensor, ...], dp_index: int, dp_ranks: int, edp_index: int,
                    replicas: int) -> int:
    """Elements whose AdamW moments one rank holds.

    ``dp_index``: the rank's place among the ``dp_ranks`` data-parallel ranks that share the dense
    parameters; ``edp_index``: its place in its expert-data-parallel group of ``replicas`` ranks.
    Shares are handed out as :func:`greedy_owners` does, in rank order (ties to the lower rank).
    """
    dense = [p.numel for p in params if not p.expert]
    expert = [p.numel for p in params if p.expert]
    if not shards_optimizer(cfg):
        return sum(dense) + sum(expert)
    dense_share = greedy_owners(dense, dp_ranks)[dp_index] if dense else 0
    expert_share = greedy_owners(expert, replicas)[edp_index] if expert else 0
    return dense_share + expert_share
