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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, permute, plan_dispatch, unpermute
from moe_trainer.moe.router import Routing
from moe_trainer.parallel.comm import all_to_all, all_to_all_counts


@dataclass
class CommCounters:
    """Rows, bytes and time this rank moved through all-to-all since the last ``take`` (telemetry).

    Kept per phase: ``dispatch`` (tokens to experts) and ``combine`` (results back).
    Rows a rank sends to itself are not counted: they never leave the process.
    """

    rows_sent: dict[str, int] = field(default_factory=lambda: {"dispatch": 0, "combine": 0})
    rows_recv: dict[str, int] = field(default_factory=lambda: {"dispatch": 0, "combine": 0})
    bytes_sent: dict[str, int] = field(default_factory=lambda: {"dispatch": 0, "combine": 0})
    seconds: dict[str, float] = field(default_factory=lambda: {"dispatch": 0.0, "combine": 0.0})

    def add(self, phase: str, rows_sent: int, rows_recv: int, row_bytes: int, seconds: float) -> None:
        self.rows_sent[phase] += rows_sent
        self.rows_recv[phase] += rows_recv
        self.bytes_sent[phase] += rows_sent * row_bytes
        self.seconds[phase] += seconds

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase in ("dispatch", "combine"):
            out[f"a2a_{phase}_rows_sent"] = self.rows_sent[phase]
            out[f"a2a_{phase}_rows_recv"] = self.rows_recv[phase]
            out[f"a2a_{phase}_time_s"] = self.seconds[phase]
        out["a2a_rows_sent"] = sum(self.rows_sent.values())
        out["a2a_rows_recv"] = sum(self.rows_recv.values())
        out["a2a_bytes_sent"] = sum(self.bytes_sent.values())
        out["a2a_time_s"] = sum(self.seconds.values())
        for counter in (self.rows_sent, self.rows_recv, self.bytes_sent, self.seconds):
            for phase in counter:
                counter[phase] = 0
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
        self._count("dispatch", send_splits, recv_splits, x_MD.shape[-1] * x_MD.element_size(),
                    time.perf_counter() - t0)
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
        self._count("combine", meta.recv_splits, meta.send_splits, y_ND.shape[-1] * y_ND.element_size(),
                    time.perf_counter() - t0)
        plan = dispatched.plan
        return unpermute(y_ND, plan.token_idx_N, plan.weight_N, dispatched.num_tokens)

    def _count(self, phase: str, send: list[int], recv: list[int], row_bytes: int, seconds: float) -> None:
        me = self.group_rank
        self.counters.add(phase, sum(send) - send[me], sum(recv) - recv[me], row_bytes, seconds)
