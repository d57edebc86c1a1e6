"""Gradient and statistics reduction for ranks of a process group, written once for every strategy.

Every rank's loss is the mean over *its* rows, so the global-batch gradient is
the average of the data-parallel ranks' gradients:

- dense parameters: all-reduce (sum) over the data-parallel ranks, divide by their number;
- expert parameters: the all-to-all backward already summed the contributions of
  every rank that sent rows; an all-reduce over the ranks holding replicas of the
  same experts adds the other replicas' (none when experts are not replicated);
  then divide by the number of data-parallel ranks.

The clipping norm counts every distinct tensor once: dense squares from one rank of
the norm group, expert squares from every rank that owns a shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from moe_trainer.moe.experts import is_expert_param
from moe_trainer.parallel.comm import dist, guarded
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import Elapsed, Span, mark


def all_reduce_flat(grads: list[Tensor], group: Any, label: str) -> None:
    """One all-reduce (sum) for a list of tensors (flattened), written back in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    guarded(label, lambda: dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group))
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def squared_norms(dense: list[Tensor], expert: list[Tensor], device: torch.device) -> Tensor:
    """``[sum of dense squares, sum of expert squares]`` in float64."""
    sq = torch.zeros(2, dtype=torch.float64, device=device)
    for i, grads in enumerate((dense, expert)):
        if grads:
            sq[i] = torch.stack([torch.linalg.vector_norm(g) for g in grads]).double().square().sum()
    return sq


@dataclass(frozen=True)
class Groups:
    """Which process group each reduction uses (``None`` = the world group)."""

    data: Any  # data-parallel ranks: dense gradients, losses, router loads
    expert_replicas: Any  # ranks holding the same experts; unused when replicas == 1
    replicas: int  # how many ranks hold each expert
    norm: Any  # ranks whose squared norms add up to the global norm (None = no reduction needed)
    counts_dense_norm: bool  # this rank contributes the dense squares to the norm


class DistributedContext:
    """The :class:`moe_trainer.train.trainer.ParallelContext` of one rank in a process group."""

    def __init__(self, dp_rank: int, dp_world: int, groups: Groups, counters: CommCounters,
                 device: torch.device) -> None:
        self.dp_rank, self.dp_world = dp_rank, dp_world
        self.groups = groups
        self.counters = counters
        self.device = device
        self._sync_time = Elapsed()

    def _split(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        dense, expert = [], []
        for name, param in model.named_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # every rank must contribute the same tensors
            (expert if is_expert_param(name) else dense).append(param.grad)
        return dense, expert

    def sync_gradients(self, model: nn.Module) -> None:
        t0 = mark(self.device)
        dense, expert = self._split(model)
        all_reduce_flat(dense, self.groups.data, "all_reduce of dense gradients")
        if self.groups.replicas > 1:
            all_reduce_flat(expert, self.groups.expert_replicas, "all_reduce of expert gradients")
        for g in dense + expert:
            g.div_(self.dp_world)
        self._sync_time.add(Span.since(t0, self.device))

    def grad_norm(self, model: nn.Module) -> Tensor:
        dense, expert = self._split(model)
        sq = squared_norms(dense, expert, self.device)
        if self.groups.norm is not None:
            if not self.groups.counts_dense_norm:
                sq[0] = 0.0
            guarded("all_reduce of gradient norms", lambda: dist.all_reduce(sq, op=dist.ReduceOp.SUM,
                                                                          group=self.groups.norm))
        return sq.sum().sqrt().float()

    def all_reduce_sum(self, t: Tensor, label: str = "metrics") -> Tensor:
        out = t.detach().to(self.device, copy=True)
        guarded(f"all_reduce of {label}", lambda: dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.groups.data))
        return out.to(t.device)

    def telemetry(self) -> dict[str, float]:
        return {**self.counters.take(), "grad_sync_time_s": self._sync_time.take()}
