"""Expert-parallel dispatcher: the local plan, then all-to-all to the experts' owners and back.

dispatch: plan + permute (local, as in the reference) -> exchange per-expert counts
-> all-to-all the rows (variable split sizes, no padding) -> regroup the received
rows by local expert. combine undoes each step in reverse. Router and experts are
the single-device modules; only this class communicates.

Shape legend: T tokens, D width, E global experts, L local experts, P ranks in the
expert-parallel group, N rows sent, M rows received.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, RunsExpertsHere, permute, plan_dispatch, unpermute
from moe_trainer.moe.router import Routing
from moe_trainer.parallel.comm import COMBINE_BWD, DISPATCH_BWD, all_to_all, start_counts_exchange
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import now


@dataclass(frozen=True)
class ExpertParallelMeta:
    send_splits: list[int]  # rows this rank sends to each peer
    recv_splits: list[int]  # rows this rank receives from each peer
    regroup_idx_M: Tensor  # received order (peer, expert) -> local-expert order
    index: int  # running number of this dispatch on this rank (names it in the backward schedule)
    layer: int  # block index of the MoE layer (for error messages)


def regroup_index(recv_counts_PL: Tensor) -> Tensor:
    """Permutation from received order (peer, local expert) to (local expert, peer).

    A stable sort keeps each peer's rows in its own priority order, and peers in rank
    order, which is the order the single-process reference gives each expert's rows.
    """
    peers, local = recv_counts_PL.shape
    local_expert_M = torch.repeat_interleave(torch.arange(local).repeat(peers), recv_counts_PL.flatten())
    return torch.argsort(local_expert_M, stable=True)


class AllToAllDispatcher(RunsExpertsHere):
    """Dispatch over a process group whose ranks ``owner_offset ...`` own ``E / num_owners`` experts each.

    Expert parallelism: every rank of the group owns experts (``owner_offset=0``).
    Disaggregated: coordinators own none and expert actors own all
    (``owner_offset=num_coordinators``); ``announce`` then runs before each backward
    all-to-all, so the expert actors learn which one comes next.
    """

    def __init__(self, num_experts: int, capacity_factor: float | None, group: Any, group_size: int,
                 group_rank: int, counters: CommCounters | None = None, owner_offset: int = 0,
                 num_owners: int | None = None, announce: Callable[[int, int], None] | None = None) -> None:
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.group = group
        self.group_size = group_size
        self.group_rank = group_rank
        self.owner_offset = owner_offset
        self.experts_per_owner = num_experts // (num_owners or group_size)
        self.counters = counters if counters is not None else CommCounters()
        self.announce = announce
        self.dispatches = 0  # dispatches so far; every rank of the group counts the same

    def send_counts(self, tokens_per_expert_E: Tensor) -> Tensor:
        """Counts laid out per destination rank: ``[group_size * experts_per_owner]``, zeros for non-owners."""
        before = self.owner_offset * self.experts_per_owner
        after = self.group_size * self.experts_per_owner - before - tokens_per_expert_E.numel()
        zeros = tokens_per_expert_E.new_zeros
        return torch.cat([zeros(before), tokens_per_expert_E, zeros(after)])

    def dispatch(self, x_TD: Tensor, routing: Routing, num_groups: int, layer: int = -1) -> Dispatched:
        num_tokens = x_TD.shape[0]
        plan = plan_dispatch(routing, self.num_experts, num_groups, num_tokens, self.capacity_factor)
        index = self.dispatches
        self.dispatches += 1
        counts = self.send_counts(plan.tokens_per_expert_E)
        label = f"all_to_all dispatch of MoE block {layer}"
        x_ND, recv_counts_PL, blocked = self.permute_while_counting(x_TD, plan.token_idx_N, counts, label)
        send_splits = counts.view(self.group_size, -1).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        t0 = now(x_ND.device)
        x_MD = all_to_all(x_ND, send_splits, recv_splits, self.group, self._announcer(index, DISPATCH_BWD),
                          self._backward_timer("dispatch_bwd", recv_splits, send_splits, x_ND), label)
        # communication only: the count exchange's blocked time and the rows, not the permute
        self._count("dispatch", send_splits, recv_splits, x_MD.shape[-1] * x_MD.element_size(),
                    blocked + now(x_MD.device) - t0)
        regroup_idx_M = regroup_index(recv_counts_PL)
        meta = ExpertParallelMeta(send_splits, recv_splits, regroup_idx_M, index, layer)
        return Dispatched(x_MD.index_select(0, regroup_idx_M), recv_counts_PL.sum(0), plan, num_tokens, meta)

    def permute_while_counting(self, x_TD: Tensor, token_idx_N: Tensor, counts: Tensor,
                               label: str) -> tuple[Tensor, Tensor, float]:
        """Gathers the rows to send while the per-expert counts travel (a latency-bound exchange).

        Returns the rows (ordered by global expert, hence by owner rank), the counts received
        ``[P, E_local]`` and the seconds spent blocked in the exchange.
        """
        t0 = now(x_TD.device)
        counts_in_flight = start_counts_exchange(counts, self.group, label)
        blocked = now(x_TD.device) - t0
        x_ND = permute(x_TD, token_idx_N)
        t0 = now(x_TD.device)
        recv_counts_PL = counts_in_flight()
        return x_ND, recv_counts_PL, blocked + now(x_TD.device) - t0

    def combine(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, ExpertParallelMeta)
        y_peer_MD = torch.empty_like(y_MD).index_copy(0, meta.regroup_idx_M, y_MD)
        t0 = now(y_MD.device)
        y_ND = all_to_all(y_peer_MD, meta.recv_splits, meta.send_splits, self.group,
                          self._announcer(meta.index, COMBINE_BWD),
                          self._backward_timer("combine_bwd", meta.send_splits, meta.recv_splits, y_peer_MD),
                          f"all_to_all combine of MoE block {meta.layer}")
        self._count("combine", meta.recv_splits, meta.send_splits, y_ND.shape[-1] * y_ND.element_size(),
                    now(y_ND.device) - t0)
        plan = dispatched.plan
        return unpermute(y_ND, plan.token_idx_N, plan.weight_N, dispatched.num_tokens)

    def _announcer(self, index: int, phase: int) -> Callable[[], None] | None:
        announce = self.announce
        return None if announce is None else (lambda: announce(index, phase))

    def _backward_timer(self, phase: str, send: list[int], recv: list[int], like: Tensor) -> Callable[[float], None]:
        """Counts the backward all-to-all, which sends ``send`` rows and receives ``recv`` rows."""
        row_bytes = like.shape[-1] * like.element_size()
        return lambda seconds: self._count(phase, send, recv, row_bytes, seconds)

    def _count(self, phase: str, send: list[int], recv: list[int], row_bytes: int, seconds: float) -> None:
        self.counters.add_transfer(phase, send, recv, self.group_rank, row_bytes, seconds)
