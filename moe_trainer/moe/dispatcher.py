"""Dispatcher: moves token rows to the experts that own them and back.

The work splits into a plan (which assignments survive capacity, in which order),
a permutation (gather rows into contiguous per-expert runs) and its inverse
(weighted scatter-add back to token order). All three are O(A * D) index
operations: no dense ``[tokens, experts, capacity]`` one-hot masks.

One :class:`Dispatcher` serves every strategy; only its :class:`Transport` communicates.
The single-process reference moves nothing (:class:`LocalTransport`); a distributed
transport puts its transfer between :func:`permute` and the experts, and the reverse one
between the experts and :func:`unpermute`, reusing the same plan, so router and experts
never change.

Shape legend: T tokens, D width, E experts, A assignments, N dispatched rows (kept assignments).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from moe_trainer.moe.router import Routing, capacity, count_per_expert


@dataclass(frozen=True)
class DispatchPlan:
    """Which assignments are kept, sorted by expert; computed locally, no communication."""

    token_idx_N: Tensor  # int64 [N]: source token of each dispatched row, grouped by expert
    weight_N: Tensor  # fp32 [N]: gate weight of each dispatched row
    tokens_per_expert_E: Tensor  # int64 [E]: rows per expert after drops
    dropped: Tensor  # int64 scalar: assignments dropped past capacity


def plan_dispatch(
    routing: Routing, num_experts: int, num_groups: int, num_tokens: int, capacity_factor: float | None
) -> DispatchPlan:
    """Sorts assignments by (expert, group, priority) and drops those past capacity.

    One stable sort on ``expert * G + group`` yields contiguous expert runs; inside a
    run, groups are in order and, inside a group, assignments keep the router's
    priority order, so "position in segment" is the slot an assignment takes in that
    expert's per-group buffer. Rows whose slot is ``>= capacity`` are dropped (their
    token keeps only the residual). ``capacity_factor=None`` means dropless.

    Dropless planning never reads the device: the kept rows are all rows. With a capacity,
    selecting the kept rows has a data-dependent length (one host read per call).
    """
    expert_idx_A = routing.expert_idx_A
    group_A = routing.token_idx_A // (num_tokens // num_groups)
    key_A = expert_idx_A * num_groups + group_A
    order_A = torch.argsort(key_A, stable=True)
    if capacity_factor is None or not routing.drops_allowed:
        keep_order = order_A
        tokens_per_expert_E = count_per_expert(expert_idx_A, num_experts)
        dropped = expert_idx_A.new_zeros(())
    else:
        top_k = expert_idx_A.numel() // num_tokens
        cap = capacity(num_tokens // num_groups, top_k, num_experts, capacity_factor)
        seg_counts = count_per_expert(key_A, num_experts * num_groups)
        seg_starts = torch.cumsum(seg_counts, 0) - seg_counts
        slot_A = torch.arange(order_A.numel(), device=order_A.device) - seg_starts[key_A[order_A]]
        keep_order = order_A[slot_A < cap]
        tokens_per_expert_E = seg_counts.clamp(max=cap).view(num_experts, num_groups).sum(1)
        dropped = (slot_A >= cap).sum()
    return DispatchPlan(
        token_idx_N=routing.token_idx_A[keep_order],
        weight_N=routing.weight_A[keep_order],
        tokens_per_expert_E=tokens_per_expert_E,
        dropped=dropped,
    )


def permute(x_TD: Tensor, token_idx_N: Tensor) -> Tensor:
    """Gathers token rows into dispatch order. Backward is the scatter-add of the gradients."""
    return x_TD.index_select(0, token_idx_N)


def unpermute(y_ND: Tensor, token_idx_N: Tensor, weight_N: Tensor, num_tokens: int) -> Tensor:
    """Weights each expert output by its gate and sums the rows back per token.

    Tokens with no kept assignment get zeros: the residual connection carries them.
    The gate weights are fp32, so bf16 rows are weighted and summed in fp32 (the sum joins
    the fp32 residual stream; the router's gradient through the weights stays fp32).
    An accumulating ``index_put`` saves only the index for its backward; ``index_add``
    would also keep the weighted rows, a second copy of the expert outputs per layer.
    """
    weighted_ND = y_ND * weight_N.unsqueeze(-1)
    out_TD = weighted_ND.new_zeros(num_tokens, y_ND.shape[-1])
    return out_TD.index_put((token_idx_N,), weighted_ND, accumulate=True)


@dataclass(frozen=True)
class Dispatched:
    """Rows for the local experts (or on their way) plus what ``combine`` needs to undo the dispatch."""

    x_ND: Tensor  # rows for the local experts, contiguous per local expert (or a buffer they land in)
    tokens_per_expert_E: Tensor  # int64 [E_local]: run length of each local expert
    plan: DispatchPlan  # the local plan (source side)
    num_tokens: int
    comm: Any = None  # what the transport needs to bring the results back


class Transport(Protocol):
    """How dispatched rows reach the owners of their experts and come back.

    The only part of a dispatch that differs between strategies: :class:`LocalTransport`
    (every expert here), and in :mod:`moe_trainer.parallel` a blocking all-to-all, chunked
    all-to-alls overlapped with the experts, asynchronous all-to-alls across micro-batches,
    and point-to-point messages to expert actors.
    """

    def order(self, plan: DispatchPlan) -> DispatchPlan:
        """The plan in the order the rows travel (sorted by expert; a chunked transport regroups chunks)."""
        ...

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        """Permutes and sends: ``(rows for the local experts or their buffer, run lengths, state for the rest)``."""
        ...

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        """The local experts on the rows that arrived (a transport may move rows here too)."""
        ...

    def receive(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        """The experts' outputs back here, in the plan's row order."""
        ...


class LocalTransport:
    """Every expert lives in this process: nothing travels."""

    def order(self, plan: DispatchPlan) -> DispatchPlan:
        return plan

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        return permute(x_TD, plan.token_idx_N), plan.tokens_per_expert_E, None

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        y_ND = experts(dispatched.x_ND, dispatched.tokens_per_expert_E)
        assert isinstance(y_ND, Tensor)
        return y_ND

    def receive(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        return y_ND


class Dispatcher:
    """The one dispatcher of every strategy: plan, send, experts, receive, un-permute.

    Router and experts are the single-device modules; the plan and its inverse are the same
    for every strategy, so routing, capacity and drops never depend on the layout. Only the
    ``transport`` moves rows (the single-process reference: :class:`LocalTransport`).
    """

    def __init__(self, num_experts: int, capacity_factor: float | None, transport: Transport | None = None) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.transport: Transport = transport if transport is not None else LocalTransport()

    def dispatch(self, x_TD: Tensor, routing: Routing, num_groups: int, layer: int = -1) -> Dispatched:
        num_tokens = x_TD.shape[0]
        plan = self.transport.order(plan_dispatch(routing, self.num_experts, num_groups, num_tokens,
                                                  self.capacity_factor))
        x_ND, counts_E, state = self.transport.send(x_TD, plan, layer)
        return Dispatched(x_ND, counts_E, plan, num_tokens, state)

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        return self.transport.run_experts(experts, dispatched)

    def combine(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        plan = dispatched.plan
        return unpermute(self.transport.receive(y_ND, dispatched), plan.token_idx_N, plan.weight_N,
                         dispatched.num_tokens)
