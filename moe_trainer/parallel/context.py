"""Gradient and statistics reduction for data- and expert-parallel ranks.

Every rank's loss is the mean over *its* rows, so the global-batch gradient is
the average of the ranks' gradients:

- dense parameters: all-reduce (sum) over all ranks, divide by ``world``;
- expert parameters: the all-to-all backward already summed the contributions of
  every rank in the expert-parallel group; all-reduce over the expert-data-parallel
  group adds the other groups' (a no-op when it has one rank), divide by ``world``.
"""

from __future__ import annotations

import time
from typing import Any

import deepspeed.comm as dist
import torch
from torch import Tensor, nn

from moe_trainer.parallel.dispatcher import CommCounters
from moe_trainer.parallel.topology import Topology


def _is_expert(name: str) -> bool:
    return ".experts." in name


def _all_reduce_flat(grads: list[Tensor], group: Any) -> None:
    """One all-reduce for a list of gradients (flattened), written back in place."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


class DistributedContext:
    """The :class:`moe_trainer.train.trainer.ParallelContext` of one rank in a process group."""

    def __init__(self, topology: Topology, ep_group: Any, edp_group: Any, counters: CommCounters,
                 device: torch.device) -> None:
        self.topology = topology
        self.dp_rank = topology.rank
        self.dp_world = topology.world
        self.ep_group, self.edp_group = ep_group, edp_group
        self.counters = counters
        self.device = device
        self._sync_seconds = 0.0

    def _split(self, model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
        dense, expert = [], []
        for name, param in model.named_parameters():
            if param.grad is None:
                param.grad = torch.zeros_like(param)  # every rank must contribute the same tensors
            (expert if _is_expert(name) else dense).append(param.grad)
        return dense, expert

    def sync_gradients(self, model: nn.Module) -> None:
        t0 = time.perf_counter()
        dense, expert = self._split(model)
        _all_reduce_flat(dense, group=None)
        if self.topology.world // self.topology.ep_size > 1:
            _all_reduce_flat(expert, group=self.edp_group)
        for g in dense + expert:
            g.div_(self.dp_world)
        self._sync_seconds += time.perf_counter() - t0

    def clip_gradients(self, model: nn.Module, max_norm: float) -> Tensor:
        """Global norm: dense grads are replicated (count once); expert shards summed over the EP group."""
        dense, expert = self._split(model)
        sq = torch.zeros(2, dtype=torch.float64, device=self.device)
        if dense:
            sq[0] = torch.stack([torch.linalg.vector_norm(g) for g in dense]).double().square().sum()
        if expert:
            sq[1] = torch.stack([torch.linalg.vector_norm(g) for g in expert]).double().square().sum()
        if self.topology.ep_size > 1:
            expert_sq = sq[1:].clone()
            dist.all_reduce(expert_sq, op=dist.ReduceOp.SUM, group=self.ep_group)
            sq[1] = expert_sq[0]
        total = sq.sum().sqrt().float()
        if max_norm > 0:
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in dense + expert:
                g.mul_(coef.to(g.dtype))
        return total

    def all_reduce_sum(self, t: Tensor) -> Tensor:
        out = t.detach().to(self.device, copy=True)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)

    def telemetry(self) -> dict[str, float]:
        out = {**self.counters.take(), "grad_sync_time_s": self._sync_seconds}
        self._sync_seconds = 0.0
        return out
