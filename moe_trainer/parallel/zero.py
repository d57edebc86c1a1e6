"""ZeRO-1: each rank keeps the AdamW state of only the parameters it owns and sends their updates to the others.

Stage 1 of Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models" (https://arxiv.org/abs/1910.02054), at parameter granularity like torch's
``ZeroRedundancyOptimizer``. A *domain* is a set of ranks holding identical copies of some
parameters: every data-parallel rank for the dense parameters, one expert-data-parallel group
for a rank's experts. Inside a domain each parameter has one owner. Every rank still
all-reduces every gradient and computes the same global norm
(:class:`~moe_trainer.parallel.context.DistributedContext`); then each rank's optimizer (which
holds only its owned parameters, :func:`~moe_trainer.train.optim.build_optimizer`) updates
them, and each owner broadcasts its updated parameters, as one flat bucket per owner, to the
other ranks of the domain. The fused AdamW update is elementwise, so a parameter gets
bit-for-bit the update it gets without sharding.

Why whole parameters and not slices of one flat buffer: checkpoint entries stay one per
parameter (and per global expert, :mod:`moe_trainer.train.sharded_checkpoint`), so a rank
writes and reads exactly the entries it owns and any layout, sharded or not, loads any
other. The cost is balance: largest-first assignment of whole tensors leaves the largest
rank 0.04 % above an even share of the dense state at 2 ranks on the pre-2026-12-04 default model, but a
model whose embedding dwarfs the rest cannot be cut finer than that embedding
(docs/architecture.md, "Sharded optimizer state", measures both).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_trainer.moe.experts import is_expert_param
from moe_trainer.parallel.comm import dist, guarded
from moe_trainer.parallel.zero_owners import Domain, domain_owners
from moe_trainer.timing import Elapsed, Span, mark


@dataclass
class Bucket:
    """The parameters one owner broadcasts to the other ranks of a domain: one collective per step."""

    owner: int
    group: Any
    names: list[str] = field(default_factory=list)


class OptimizerShards:
    """Which parameters' optimizer state this rank holds, and the broadcast of their updates.

    Domains with the same ranks (dense and experts under ``data_parallel``) share their
    buckets, so an owner sends all it updated in one broadcast.
    """

    def __init__(self, rank: int, domains: Sequence[Domain]) -> None:
        self.rank = rank
        self.owner, loads = domain_owners(domains)
        buckets: dict[tuple[int, int], Bucket] = {}  # (first domain with these ranks, owner) -> bucket
        first = {}  # ranks -> position of the first domain with them
        for position, domain in enumerate(domains):
            if len(domain.ranks) > 1:
                at = first.setdefault(domain.ranks, position)
                for name in domain.sizes:  # model order inside a bucket
                    owner = self.owner[name]
                    buckets.setdefault((at, owner), Bucket(owner, domain.group)).names.append(name)
        # a fixed order (domain, then owner): two ranks sharing two groups must issue their broadcasts alike
        self.buckets = [buckets[key] for key in sorted(buckets)]
        self.loads = loads  # bytes of optimizer state per rank of this rank's domains
        self._time = Elapsed()

    @classmethod
    def for_model(cls, model: nn.Module, rank: int, dense: tuple[Sequence[int], Any],
                  experts: tuple[Sequence[int], Any]) -> OptimizerShards:
        """Dense parameters sharded over ``dense`` (ranks, group), expert parameters over ``experts``."""
        sizes: tuple[dict[str, int], dict[str, int]] = ({}, {})
        for name, p in model.named_parameters():
            if p.requires_grad:
                sizes[is_expert_param(name)][name] = adamw_state_bytes(p)
        return cls(rank, [Domain(tuple(sorted(ranks)), group, part)
                          for (ranks, group), part in zip((dense, experts), sizes, strict=True)])

    def owns(self, name: str) -> bool:
        """Whether this rank holds (updates, saves, loads) the optimizer state of parameter ``name``."""
        return self.owner.get(name) == self.rank

    def after_step(self, model: nn.Module, applied: bool) -> None:
        """Every rank gets the owners' updated parameters (when the step was ``applied``).

        The gradients of parameters another rank owns are dropped: their owner has used them
        (and clipped its copy in the fused step), so what stays is only what this rank's
        update read, and their memory is free until the next backward.
        """
        params = dict(model.named_parameters())
        if applied and self.buckets:
            device = params[self.buckets[0].names[0]].device
            t0 = mark(device)
            for bucket in self.buckets:
                self._broadcast(bucket, [params[n].detach() for n in bucket.names])
            self._time.add(Span.since(t0, device))
        for name, p in params.items():
            if name in self.owner and not self.owns(name):
                p.grad = None

    def _broadcast(self, bucket: Bucket, tensors: list[Tensor]) -> None:
        if bucket.owner == self.rank:
            flat = torch.cat([t.reshape(-1) for t in tensors])
        else:
            flat = tensors[0].new_empty(sum(t.numel() for t in tensors))
        guarded(f"broadcast of the parameters rank {bucket.owner} updated",
                lambda: dist.broadcast(flat, src=bucket.owner, group=bucket.group))
        if bucket.owner != self.rank:
            for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
                t.copy_(part.view_as(t))

    def take_time(self) -> float:
        """Seconds spent broadcasting updated parameters since the last call (telemetry)."""
        return self._time.take()


def adamw_state_bytes(p: Tensor) -> int:
    """Bytes of AdamW's two moments for ``p`` (the per-parameter step counter aside)."""
    return 2 * p.numel() * p.element_size()
