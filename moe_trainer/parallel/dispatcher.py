"""Expert-parallel transport: all-to-all to the experts' owners and back.

Under the one :class:`~moe_trainer.moe.dispatcher.Dispatcher`: plan + permute (local, as in
the reference) -> exchange per-expert counts -> all-to-all the rows (variable split sizes,
no padding) -> regroup the received rows by local expert; the way back undoes each step.

Host reads: the all-to-all of rows needs its split sizes as Python ints, so each
dispatch reads the sent and received split sizes once, together
(:meth:`~moe_trainer.parallel.protocol.Route.open`); nothing else in dispatch or combine
waits for the device.

Shape legend: T tokens, D width, E global experts, L local experts, P ranks in the
expert-parallel group, N rows sent, M rows received.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, DispatchPlan, permute
from moe_trainer.parallel.comm import all_to_all, start_counts_exchange
from moe_trainer.parallel.protocol import Route
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import Span, mark


@dataclass(frozen=True)
class ExpertParallelMeta:
    route: Route  # split sizes and the regrouping of this dispatch
    layer: int  # block index of the MoE layer (for error messages)


class AllToAllTransport:
    """Rows to the experts' owners by a blocking all-to-all over an expert-parallel group, and back.

    Every rank of the group owns ``E / group_size`` experts. The per-expert counts travel
    first (asynchronously, while the rows are gathered), then the rows with variable split
    sizes; :class:`~moe_trainer.parallel.protocol.Route` regroups what arrived. The chunked
    and asynchronous transports reuse the count exchange and the route.
    """

    def __init__(self, group: Any, group_size: int, group_rank: int, num_experts: int,
                 counters: CommCounters | None = None) -> None:
        self.group = group
        self.group_size = group_size
        self.group_rank = group_rank
        self.experts_per_owner = num_experts // group_size
        self.counters = counters if counters is not None else CommCounters()

    def order(self, plan: DispatchPlan) -> DispatchPlan:
        return plan

    def permute_while_counting(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor]:
        """Gathers the rows to send while the per-expert counts travel (a latency-bound exchange).

        Returns the rows in the plan's order (by global expert, hence by owner rank) and the
        counts received ``[P, L]``; the time spent starting and awaiting the exchange counts as
        ``dispatch`` communication time.
        """
        t0 = mark(x_TD.device)
        counts_in_flight = start_counts_exchange(plan.tokens_per_expert_E, self.group,
                                                 f"all_to_all dispatch of MoE block {layer}")
        self.counters.add("dispatch", 0, 0, 0, Span.since(t0, x_TD.device))
        x_ND = permute(x_TD, plan.token_idx_N)
        t0 = mark(x_TD.device)
        recv_counts_PL = counts_in_flight()
        self.counters.add("dispatch", 0, 0, 0, Span.since(t0, x_TD.device))
        return x_ND, recv_counts_PL

    def open_route(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Route]:
        """The rows to send and the dispatch's :class:`~moe_trainer.parallel.protocol.Route`."""
        x_ND, recv_counts_PL = self.permute_while_counting(x_TD, plan, layer)
        return x_ND, Route.open(plan.tokens_per_expert_E.view(self.group_size, -1), recv_counts_PL)

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        x_ND, route = self.open_route(x_TD, plan, layer)
        x_MD = self._exchange(x_ND, route.send_splits, route.recv_splits, "dispatch", layer)
        return route.to_experts(x_MD), route.counts_L, ExpertParallelMeta(route, layer)

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        y_MD = experts(dispatched.x_ND, dispatched.tokens_per_expert_E)
        assert isinstance(y_MD, Tensor)
        return y_MD

    def receive(self, y_MD: Tensor, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, ExpertParallelMeta)
        route = meta.route
        return self._exchange(route.to_peers(y_MD), route.recv_splits, route.send_splits, "combine", meta.layer)

    def _exchange(self, x: Tensor, send: list[int], recv: list[int], phase: str, layer: int) -> Tensor:
        """The rows' all-to-all of ``phase``, counted (communication only, not the permutes around it)."""
        t0 = mark(x.device)
        out = all_to_all(x, send, recv, self.group, self._backward_timer(f"{phase}_bwd", recv, send, x),
                         f"all_to_all {phase} of MoE block {layer}")
        self._count(phase, send, recv, out.shape[-1] * out.element_size(), Span.since(t0, out.device))
        return out

    def _backward_timer(self, phase: str, send: list[int], recv: list[int], like: Tensor) -> Callable[[Span], None]:
        """Counts the backward all-to-all, which sends ``send`` rows and receives ``recv`` rows."""
        row_bytes = like.shape[-1] * like.element_size()
        return lambda seconds: self._count(phase, send, recv, row_bytes, seconds)

    def _count(self, phase: str, send: list[int], recv: list[int], row_bytes: int, seconds: Span) -> None:
        self.counters.add_transfer(phase, send, recv, self.group_rank, row_bytes, seconds)
