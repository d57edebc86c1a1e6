"""Disaggregated strategy: coordinators run everything but the experts; expert actors run only experts.

Ranks ``0 .. C-1`` are coordinators (data parallel among themselves: embeddings,
attention, norms, dense FFNs, routers, LM head); ranks ``C .. C+X-1`` are expert
actors holding ``E / X`` experts of every MoE layer. Both kinds share one process
group; tokens move by ``all_to_all_single`` in which coordinators only send rows
(dispatch) and expert actors only send results back (combine).

Expert actors cannot see the coordinators' autograd graph, so they follow a schedule:

- forward: the coordinators' order is fixed by ``Transformer.forward_microbatches``
  (per MoE block: dispatch every micro-batch, then combine every micro-batch), and the
  expert server replays it: receive micro-batch i, compute it at once (while
  coordinators run attention for micro-batch i+1), later send the results;
- backward: the autograd engine picks the order, so each coordinator announces the
  next backward all-to-all (dispatch number and phase) with a tiny all-reduce just
  before it; the expert server waits for the announcement and plays its side.

Shape legend: D width, M rows received by an expert actor, L local experts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from moe_trainer.config.schema import Config
from moe_trainer.model.transformer import init_weights, is_moe_block
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.parallel.comm import COMBINE_BWD, all_to_all_counts, dist, guarded
from moe_trainer.parallel.context import squared_norms
from moe_trainer.parallel.dispatcher import regroup_index
from moe_trainer.timing import Elapsed, Span, mark
from moe_trainer.train.optim import build_optimizer, clipped_step, set_lr
from moe_trainer.train.precision import compute_dtype
from moe_trainer.train.trainer import process_memory_mb

_NOBODY = -(2**62)  # what expert actors contribute to an announcement (coordinators' values win a MAX)


@dataclass(frozen=True)
class Roles:
    """Rank layout of a disaggregated job."""

    num_coordinators: int
    num_expert_actors: int
    num_experts: int

    @property
    def world(self) -> int:
        return self.num_coordinators + self.num_expert_actors

    @property
    def experts_per_actor(self) -> int:
        return self.num_experts // self.num_expert_actors

    def is_coordinator(self, rank: int) -> bool:
        return rank < self.num_coordinators

    def expert_range(self, rank: int) -> tuple[int, int]:
        """``(first global expert, count)`` held by ``rank`` (coordinators hold none)."""
        if self.is_coordinator(rank):
            return 0, 0
        return (rank - self.num_coordinators) * self.experts_per_actor, self.experts_per_actor


def announce(index: int, phase: int, device: torch.device) -> None:
    """Coordinator side: tells the expert actors which backward all-to-all comes next.

    Every coordinator sends ``(index, phase)`` and its negation, so one MAX all-reduce
    also reveals whether the coordinators disagree (their graphs must be identical).
    The header lives on the rank's device: NCCL reduces only CUDA tensors.
    """
    _reduce_announcement(torch.tensor([index, phase, -index, -phase], dtype=torch.int64, device=device))


def await_announcement(device: torch.device) -> tuple[int, int]:
    """Expert-actor side of :func:`announce`.

    Expert actors see the same reduced header as the coordinators, so they detect a
    disagreement in the same all-reduce and fail with them, instead of playing one
    coordinator's side and waiting in the next all-to-all until ``parallel.timeout_s``.
    """
    return guarded("backward announcement (expert actor)",
                   lambda: _reduce_announcement(torch.full((4,), _NOBODY, dtype=torch.int64, device=device)))


def _reduce_announcement(header: Tensor) -> tuple[int, int]:
    """MAX all-reduce of ``header``; the announced ``(index, phase)``, or an error if coordinators differ.

    After the reduction the header is ``(max index, max phase, -min index, -min phase)``
    over the coordinators: they agree exactly when max and min coincide. Read on the host
    in one go: the schedule is host control flow.
    """
    guarded("all_reduce of the backward announcement", lambda: dist.all_reduce(header, op=dist.ReduceOp.MAX))
    max_index, max_phase, neg_min_index, neg_min_phase = header.tolist()
    high, low = (max_index, max_phase), (-neg_min_index, -neg_min_phase)
    if high != low:
        raise RuntimeError(f"coordinators disagree on the backward schedule: they announced dispatches "
                           f"{low[0]}..{high[0]}, phases {low[1]}..{high[1]} for the same all-to-all; their autograd "
                           "graphs must be identical (same model and parallel.micro_batches on every coordinator)")
    return high


class ExpertShardModel(nn.Module):
    """Only the experts of every MoE block, named as in the full Transformer (``blocks.3.ffn.experts.*``).

    The names make initialisation and checkpoint entries identical to the
    single-process model's, expert for expert.
    """

    def __init__(self, cfg: Config, expert_range: tuple[int, int]) -> None:
        super().__init__()
        first, count = expert_range
        self.blocks = nn.ModuleDict({
            str(i): nn.ModuleDict({"ffn": nn.ModuleDict({"experts": SwiGLUExperts(
                count, cfg.model.d_model, cfg.moe.expert_hidden, first_expert=first)})})
            for i in range(cfg.model.n_layers) if is_moe_block(i, cfg.moe)
        })
        init_weights(self, cfg.train.seed, cfg.model)
        for _, experts in self.named_layers():  # recompute=block reaches the experts wherever they live
            experts.recompute = cfg.train.recompute == "block"

    def named_layers(self) -> list[tuple[int, SwiGLUExperts]]:
        """``(block index, experts)`` of every MoE block, in depth order."""
        return [(int(i), block["ffn"]["experts"]) for i, block in self.blocks.items()]  # type: ignore[index]


@dataclass
class _Served:
    """One dispatch served by this expert actor, kept for its backward."""

    recv_splits: list[int]
    regroup_idx_M: Tensor
    x_MD: Tensor  # leaf: the rows received, in local-expert order
    y_MD: Tensor  # the experts' output for them


@dataclass
class _StepClock:
    busy: Elapsed = field(default_factory=Elapsed)  # computing experts / optimizer (resolved at the step's end)
    rows: int = 0  # rows received from coordinators


class ExpertServer:
    """Runs an expert actor: the mirror of the coordinators' collective schedule, step after step.

    Has the attributes a checkpoint needs (``model``, ``optimizer``, ``step``,
    ``tokens_seen``, ``ctx.device``) so :mod:`moe_trainer.train.sharded_checkpoint`
    saves and loads it like a Trainer.
    """

    def __init__(self, cfg: Config, rank: int, roles: Roles, device: torch.device, group: Any = None) -> None:
        self.cfg, self.rank, self.roles = cfg, rank, roles
        self.model = ExpertShardModel(cfg, roles.expert_range(rank)).to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.group = group
        self.ctx = _DeviceOnly(device)
        self.step = 0
        self.tokens_seen = 0
        self.dispatches = 0  # must count exactly like the coordinators' dispatcher
        self.micro_batches = cfg.parallel.micro_batches
        self.accum_steps = cfg.train.grad_accum_steps  # coordinators run this many forward/backward passes a step
        self.d_model = cfg.model.d_model
        # the coordinators send rows (and gradients) in the compute dtype: receive buffers must match
        self.payload_dtype = compute_dtype(cfg.train.precision)

    def _rows(self, count: int) -> Tensor:
        """A receive buffer for ``count`` rows (or an empty send buffer) in the payload dtype."""
        return torch.empty(count, self.d_model, dtype=self.payload_dtype, device=self.ctx.device)

    # ----- forward: replay of Transformer.forward_microbatches -----
    def _forward(self, micro_batches: int, keep: bool, clock: _StepClock) -> dict[int, _Served]:
        served: dict[int, _Served] = {}
        device = self.ctx.device
        empty = self._rows(0)
        for block, experts in self.model.named_layers():
            pending: list[tuple[int, _Served]] = []
            for _ in range(micro_batches):
                index = self.dispatches
                self.dispatches += 1
                counts = torch.zeros(self.roles.world * self.roles.experts_per_actor, dtype=torch.int64,
                                     device=device)
                label = f"all_to_all dispatch of MoE block {block} (expert actor)"
                recv_counts_PL = all_to_all_counts(counts, self.group, label)
                recv_splits = recv_counts_PL.sum(1).tolist()
                x_peer_MD = self._rows(sum(recv_splits))
                self._a2a(label, x_peer_MD, empty, recv_splits, [0] * self.roles.world)
                t0 = mark(device)
                regroup_idx_M = regroup_index(recv_counts_PL, x_peer_MD.shape[0])
                x_MD = x_peer_MD.index_select(0, regroup_idx_M).requires_grad_(keep)
                clock.rows += x_MD.shape[0]
                with torch.set_grad_enabled(keep):
                    y_MD = experts(x_MD, recv_counts_PL.sum(0))
                clock.busy.add(Span.since(t0, device))
                pending.append((index, _Served(recv_splits, regroup_idx_M, x_MD, y_MD)))
            for index, item in pending:
                y_peer_MD = torch.empty_like(item.y_MD).index_copy(0, item.regroup_idx_M, item.y_MD.detach())
                self._a2a(f"all_to_all combine of MoE block {block} (expert actor)", empty.clone(), y_peer_MD,
                          [0] * self.roles.world, item.recv_splits)
                if keep:
                    served[index] = item
        return served

    # ----- backward: driven by the coordinators' announcements -----
    def _backward(self, served: dict[int, _Served], clock: _StepClock) -> None:
        device = self.ctx.device
        empty = self._rows(0)
        for _ in range(2 * len(served)):
            index, phase = await_announcement(device)
            item = served[index]
            if phase == COMBINE_BWD:
                grad_peer_MD = self._rows(sum(item.recv_splits))
                self._a2a("all_to_all combine backward (expert actor)", grad_peer_MD, empty, item.recv_splits,
                          [0] * self.roles.world)
                t0 = mark(device)
                item.y_MD.backward(grad_peer_MD.index_select(0, item.regroup_idx_M))
                clock.busy.add(Span.since(t0, device))
            else:
                grad_MD = item.x_MD.grad if item.x_MD.grad is not None else torch.zeros_like(item.x_MD)
                grad_peer_MD = torch.empty_like(grad_MD).index_copy(0, item.regroup_idx_M, grad_MD)
                self._a2a("all_to_all dispatch backward (expert actor)", empty.clone(), grad_peer_MD,
                          [0] * self.roles.world, item.recv_splits)
                del served[index]

    def _a2a(self, label: str, out: Tensor, inp: Tensor, recv: list[int], send: list[int]) -> None:
        guarded(label, lambda: dist.all_to_all_single(out, inp, output_split_sizes=recv, input_split_sizes=send,
                                                      group=self.group))

    def train_step(self) -> dict[str, Any]:
        clock = _StepClock()
        t_start = mark(self.ctx.device)
        lr = set_lr(self.optimizer, self.step, self.cfg.train)
        for p in self.model.parameters():
            p.grad = torch.zeros_like(p)
        for _ in range(self.accum_steps):  # gradients add up in .grad over the passes, as on the coordinators
            served = self._forward(self.micro_batches, keep=True, clock=clock)
            self._backward(served, clock)
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        for g in grads:  # each coordinator's loss is a mean over its rows: the global gradient is the average
            g.div_(self.roles.num_coordinators)
        sq = squared_norms([], grads, self.ctx.device)
        # the coordinators' grad_norm, same collective
        guarded("all_reduce of gradient norms", lambda: dist.all_reduce(sq, op=dist.ReduceOp.SUM))
        t0 = mark(self.ctx.device)
        norm = sq.sum().sqrt().float()
        finite = bool(torch.isfinite(norm))  # same global norm as the coordinators: same decision
        if finite:
            clipped_step(self.optimizer, norm, self.cfg.train.grad_clip)
        clock.busy.add(Span.since(t0, self.ctx.device))
        self.step += 1
        total = Span.since(t_start, self.ctx.device).seconds()  # the step's one wait for its timings
        busy = clock.busy.take()
        # step_skipped: the chunk loop (nan_guard.run_steps) must stop this rank where it stops the coordinators
        return {"step": self.step, "lr": lr, "step_skipped": not finite, "expert_busy_s": busy,
                "expert_wait_s": total - busy, "expert_step_time_s": total, "expert_rows_recv": clock.rows,
                "expert_mem_rss_mb": process_memory_mb()}

    def evaluate(self, batches: int) -> None:
        clock = _StepClock()
        with torch.no_grad():
            for _ in range(batches * self.accum_steps):  # coordinators evaluate in the training step's passes
                self._forward(self.micro_batches, keep=False, clock=clock)


class _DeviceOnly:
    def __init__(self, device: torch.device) -> None:
        self.device = device
