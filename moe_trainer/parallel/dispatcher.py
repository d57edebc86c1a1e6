"""Expert-parallel dispatcher: the local plan, then all-to-all to the experts' owners and back.

dispatch: plan + permute (local, as in the reference) -> exchange per-expert counts
-> all-to-all the rows (variable split sizes, no padding) -> regroup the received
rows by local expert. combine undoes each step in reverse. Router and experts are
the single-device modules; only this class communicates.

Shape legend: T tokens, D width, E global experts, L local experts, P ranks in the
expert-parallel group, N rows sent, M rows received.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, permute, plan_dispatch, unpermute
from moe_trainer.moe.router import Routing
from moe_trainer.parallel.comm import all_to_all, all_to_all_counts


@dataclass
class CommCounters:
    """Rows and bytes this rank moved through all-to-all since the last reset (for telemetry)."""

    rows_sent_remote: int = 0  # rows sent to other ranks (own rows excluded)
    rows_recv_remote: int = 0  # rows received from other ranks
    bytes_sent: int = 0  # forward dispatch + combine payload bytes leaving this rank
    calls: int = 0  # all-to-all calls (forward only)
    seconds: float = 0.0  # wall time inside forward all-to-alls (synchronous on gloo)

    def take(self) -> dict[str, float]:
        out = {"a2a_rows_sent": self.rows_sent_remote, "a2a_rows_recv": self.rows_recv_remote,
               "a2a_bytes_sent": self.bytes_sent, "a2a_calls": self.calls, "a2a_time_s": self.seconds}
        self.rows_sent_remote = self.rows_recv_remote = self.bytes_sent = self.calls = 0
        self.seconds = 0.0
        return out


@dataclass(frozen=True)
class ExpertParallelMeta:
    send_splits: list[int]  # rows this rank sends to each peer
    recv_splits: list[int]  # rows this rank receives from each peer
    regroup_idx_M: Tensor  # received order (peer, expert) -> local-expert order


class AllToAllDispatcher:
    """Dispatch across an expert-parallel group of ``P`` ranks, each owning ``E / P`` experts."""

    def __init__(self, num_experts: int, capacity_factor: float | None, group: Any, group_size: int,
                 group_rank: int, counters: CommCounters | None = None) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.group = group
        self.group_size = group_size
        self.group_rank = group_rank
        self.local_experts = num_experts // group_size
        self.counters = counters if counters is not None else CommCounters()

    def dispatch(self, x_TD: Tensor, routing: Routing, num_groups: int) -> Dispatched:
        num_tokens = x_TD.shape[0]
        plan = plan_dispatch(routing, self.num_experts, num_groups, num_tokens, self.capacity_factor)
        x_ND = permute(x_TD, plan.token_idx_N)  # already ordered by global expert, hence by owner rank
        t0 = time.perf_counter()
        recv_counts_PL = all_to_all_counts(plan.tokens_per_expert_E, self.group)
        send_splits = plan.tokens_per_expert_E.view(self.group_size, self.local_experts).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        x_MD = all_to_all(x_ND, send_splits, recv_splits, self.group)
        self._count(send_splits, recv_splits, x_MD.shape[-1] * x_MD.element_size(), time.perf_counter() - t0)
        # received rows come grouped by (peer, local expert); experts need (local expert, peer)
        local_expert_M = torch.repeat_interleave(
            torch.arange(self.local_experts).repeat(self.group_size), recv_counts_PL.flatten())
        regroup_idx_M = torch.argsort(local_expert_M, stable=True)
        meta = ExpertParallelMeta(send_splits, recv_splits, regroup_idx_M)
        return Dispatched(x_MD.index_select(0, regroup_idx_M), recv_counts_PL.sum(0), plan, num_tokens, meta)

    def combine(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, ExpertParallelMeta)
        y_peer_MD = torch.empty_like(y_MD).index_copy(0, meta.regroup_idx_M, y_MD)
        t0 = time.perf_counter()
        y_ND = all_to_all(y_peer_MD, meta.recv_splits, meta.send_splits, self.group)
        self._count(meta.recv_splits, meta.send_splits, y_ND.shape[-1] * y_ND.element_size(),
                    time.perf_counter() - t0)
        plan = dispatched.plan
        return unpermute(y_ND, plan.token_idx_N, plan.weight_N, dispatched.num_tokens)

    def _count(self, send: list[int], recv: list[int], row_bytes: int, seconds: float) -> None:
        remote_sent = sum(send) - send[self.group_rank]
        self.counters.rows_sent_remote += remote_sent
        self.counters.rows_recv_remote += sum(recv) - recv[self.group_rank]
        self.counters.bytes_sent += remote_sent * row_bytes
        self.counters.calls += 1
        self.counters.seconds += seconds
