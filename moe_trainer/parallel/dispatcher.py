"""Expert-parallel dispatcher: the local plan, then all-to-all to the experts' owners and back.

dispatch: plan + permute (local, as in the reference) -> exchange per-expert counts
-> all-to-all the rows (variable split sizes, no padding) -> regroup the received
rows by local expert. combine undoes each step in reverse. Router and experts are
the single-device modules; only this class communicates.

Host reads: the all-to-all of rows needs its split sizes as Python ints, so each
dispatch reads the sent and received split sizes once, together (:func:`host_splits`);
nothing else in dispatch or combine waits for the device.

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
from moe_trainer.timing import Span, mark


@dataclass(frozen=True)
class ExpertParallelMeta:
    send_splits: list[int]  # rows this rank sends to each peer
    recv_splits: list[int]  # rows this rank receives from each peer
    regroup_idx_M: Tensor  # received order (peer, expert) -> local-expert order
    index: int  # running number of this dispatch on this rank (names it in the backward schedule)
    layer: int  # block index of the MoE layer (for error messages)


def regroup_index(recv_counts_PL: Tensor, rows: int) -> Tensor:
    """Permutation from received order (peer, local expert) to (local expert, peer), on the counts' device.

    A stable sort keeps each peer's rows in its own priority order, and peers in rank
    order, which is the order the single-process reference gives each expert's rows.
    ``rows`` (the received total, known on the host from the split sizes) fixes the
    output length, so building the index never reads the device.
    """
    peers, local = recv_counts_PL.shape
    local_ids_PL = torch.arange(local, device=recv_counts_PL.device).repeat(peers)
    local_expert_M = torch.repeat_interleave(local_ids_PL, recv_counts_PL.flatten(), output_size=rows)
    return torch.argsort(local_expert_M, stable=True)


def host_splits(send_counts_PL: Tensor, recv_counts_PL: Tensor) -> tuple[list[int], list[int]]:
    """Rows sent to and received from each peer, as Python ints: one device-to-host read for both."""
    both = torch.stack([send_counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
    return both[0], both[1]


class AllToAllDispatcher(RunsExpertsHere):
    """Dispatch over a process group whose ranks ``owner_offset ...`` own ``E / num_owners`` experts each.

    Expert parallelism: every rank of the group owns experts (``owner_offset=0``).
    Disaggregated: coordinators own none and expert actors own all
    (``owner_offset=num_coordinators``); ``announce`` then runs before each backward
    all-to-all, so the expert actors learn which one comes next.
    """

    def __init__(self, num_experts: int, capacity_factor: float | None, group: Any, group_size: int,
                 group_rank: int, counters: CommCounters | None = None, owner_offset: int = 0,
                 num_owners: int | None = None,
                 announce: Callable[[int, int, torch.device], None] | None = None) -> None:
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
        x_ND, recv_counts_PL = self.permute_while_counting(x_TD, plan.token_idx_N, counts, label)
        send_splits, recv_splits = host_splits(counts.view(self.group_size, -1), recv_counts_PL)
        t0 = mark(x_ND.device)
        x_MD = all_to_all(x_ND, send_splits, recv_splits, self.group, self._announcer(index, DISPATCH_BWD, x_ND.device),
                          self._backward_timer("dispatch_bwd", recv_splits, send_splits, x_ND), label)
        # communication only: the count exchange's blocked time (counted above) and the rows, not the permute
        self._count("dispatch", send_splits, recv_splits, x_MD.shape[-1] * x_MD.element_size(),
                    Span.since(t0, x_MD.device))
        regroup_idx_M = regroup_index(recv_counts_PL, sum(recv_splits))
        meta = ExpertParallelMeta(send_splits, recv_splits, regroup_idx_M, index, layer)
        return Dispatched(x_MD.index_select(0, regroup_idx_M), recv_counts_PL.sum(0), plan, num_tokens, meta)

    def permute_while_counting(self, x_TD: Tensor, token_idx_N: Tensor, counts: Tensor,
                               label: str) -> tuple[Tensor, Tensor]:
        """Gathers the rows to send while the per-expert counts travel (a latency-bound exchange).

        Returns the rows (ordered by global expert, hence by owner rank) and the counts
        received ``[P, E_local]``; the time spent starting and awaiting the exchange counts
        as ``dispatch`` communication time.
        """
        t0 = mark(x_TD.device)
        counts_in_flight = start_counts_exchange(counts, self.group, label)
        self.counters.add("dispatch", 0, 0, 0, Span.since(t0, x_TD.device))
        x_ND = permute(x_TD, token_idx_N)
        t0 = mark(x_TD.device)
        recv_counts_PL = counts_in_flight()
        self.counters.add("dispatch", 0, 0, 0, Span.since(t0, x_TD.device))
        return x_ND, recv_counts_PL

    def combine(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, ExpertParallelMeta)
        y_peer_MD = torch.empty_like(y_MD).index_copy(0, meta.regroup_idx_M, y_MD)
        t0 = mark(y_MD.device)
        y_ND = all_to_all(y_peer_MD, meta.recv_splits, meta.send_splits, self.group,
                          self._announcer(meta.index, COMBINE_BWD, y_MD.device),
                          self._backward_timer("combine_bwd", meta.send_splits, meta.recv_splits, y_peer_MD),
                          f"all_to_all combine of MoE block {meta.layer}")
        self._count("combine", meta.recv_splits, meta.send_splits, y_ND.shape[-1] * y_ND.element_size(),
                    Span.since(t0, y_ND.device))
        plan = dispatched.plan
        return unpermute(y_ND, plan.token_idx_N, plan.weight_N, dispatched.num_tokens)

    def _announcer(self, index: int, phase: int, device: torch.device) -> Callable[[], None] | None:
        announce = self.announce
        return None if announce is None else (lambda: announce(index, phase, device))

    def _backward_timer(self, phase: str, send: list[int], recv: list[int], like: Tensor) -> Callable[[Span], None]:
        """Counts the backward all-to-all, which sends ``send`` rows and receives ``recv`` rows."""
        row_bytes = like.shape[-1] * like.element_size()
        return lambda seconds: self._count(phase, send, recv, row_bytes, seconds)

    def _count(self, phase: str, send: list[int], recv: list[int], row_bytes: int, seconds: Span) -> None:
        self.counters.add_transfer(phase, send, recv, self.group_rank, row_bytes, seconds)
