"""Expert parallelism with asynchronous all-to-alls overlapped across micro-batches.

With ``parallel.micro_batches=M`` the expert-parallel step runs M micro-batches in
lockstep through every block (:func:`~moe_trainer.parallel.schedule.run_microbatches`), and every
all-to-all is split into two autograd nodes: *issue* (starts the transfer, returns
the receive buffer) and *wait* (blocks until it has landed). Between the two, this
rank computes another micro-batch, so a transfer and the peer's lateness (ranks
drift apart by milliseconds at every collective on a shared machine) are hidden
behind useful work instead of being waited out:

    forward, per MoE block:  attend(0) route(0) issue dispatch(0) | attend(1) ...
                             wait dispatch(0) experts(0) issue combine(0) | experts(1) ...
                             wait combine(0) ...
    backward: the autograd engine runs ready nodes latest-created first, so after a
    micro-batch issues its gradient all-to-all the engine works on the other
    micro-batch's nodes before it reaches the matching wait.

Every rank builds the same graph, and the engine's order is deterministic, so
issues and waits happen in the same order on every rank (gloo and NCCL need that).
Routing, capacity and drops are those of the synchronous dispatcher: routing groups
are whole sequences (``moe.group_sequences``), so micro-batches change nothing but the
schedule, and the result equals ``single``'s.

Shape legend: T tokens, D width, N rows sent, M rows received.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, DispatchPlan
from moe_trainer.parallel.comm import AsyncWire
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.protocol import Route


@dataclass
class Transfer:
    """One all-to-all and its gradient's all-to-all: split sizes, phase and the work in flight."""

    out_splits: list[int]  # rows received from each peer (forward)
    in_splits: list[int]  # rows sent to each peer (forward)
    wire: AsyncWire
    phase: str  # dispatch | combine; the gradient's phase is ``phase + "_bwd"``
    work: Any = None
    held: list[Tensor] = field(default_factory=list)  # tensors the transfer reads or writes, kept alive

    def issue(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], phase: str) -> None:
        self.work = self.wire.start(out, inp, out_splits, in_splits, phase)
        self.held = [out, inp]

    def wait(self, phase: str, device: torch.device) -> None:
        self.wire.wait(self.work, phase, device)
        self.work, self.held = None, []  # the caller took what it needs from ``held`` before


class IssueAllToAll(torch.autograd.Function):
    """Starts the transfer and returns its receive buffer (not yet filled: pass it to :class:`AwaitAllToAll`).

    Backward: waits for the gradient's transfer, which ``AwaitAllToAll.backward`` started,
    and returns what it received (the incoming gradient is the one already sent).
    """

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, transfer: Transfer) -> Tensor:
        out = x_ND.new_empty(sum(transfer.out_splits), x_ND.shape[-1])
        transfer.issue(out, x_ND.contiguous(), transfer.out_splits, transfer.in_splits, transfer.phase)
        ctx.transfer = transfer
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        t = ctx.transfer
        grad_in = t.held[0]  # the receive buffer of the gradient's transfer
        t.wait(t.phase + "_bwd", grad_out.device)
        return grad_in, None


class AwaitAllToAll(torch.autograd.Function):
    """Waits for the transfer :class:`IssueAllToAll` started; returns the filled buffer.

    Backward: starts the gradient's transfer back (splits swapped) and returns at once,
    so the engine can run other nodes while it travels; ``IssueAllToAll.backward``
    waits for it and hands its receive buffer on as the input's gradient.
    """

    @staticmethod
    def forward(ctx: Any, buffer: Tensor, transfer: Transfer) -> Tensor:
        transfer.wait(transfer.phase, buffer.device)
        ctx.transfer = transfer
        return buffer

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        t = ctx.transfer
        grad_in = grad_out.new_empty(sum(t.in_splits), grad_out.shape[-1])
        grad_out = grad_out.contiguous()
        t.issue(grad_in, grad_out, t.in_splits, t.out_splits, t.phase + "_bwd")
        return grad_out, None


@dataclass(frozen=True)
class AsyncMeta:
    dispatch: Transfer  # rows to the experts' owners
    combine: Transfer  # expert outputs back (the same rows, the other way)
    route: Route


class AsyncAllToAllTransport(AllToAllTransport):
    """Expert-parallel transport whose row all-to-alls are issued now and awaited later.

    ``send`` issues the rows (after a synchronous count exchange: receive sizes must be
    known first); :meth:`run_experts` awaits them, runs the experts and issues the results
    back; ``receive`` awaits those. The lockstep caller
    (:func:`~moe_trainer.parallel.schedule.run_microbatches`) puts the other micro-batches'
    work between each issue and its wait.
    """

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        x_ND, route = self.open_route(x_TD, plan, layer)
        wire = AsyncWire(self.group, self.group_rank, self.counters, layer)
        meta = AsyncMeta(Transfer(route.recv_splits, route.send_splits, wire, "dispatch"),
                         Transfer(route.send_splits, route.recv_splits, wire, "combine"), route)
        x_in_flight = IssueAllToAll.apply(x_ND, meta.dispatch)
        assert isinstance(x_in_flight, Tensor)
        return x_in_flight, route.counts_L, meta

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, AsyncMeta)
        x_MD = AwaitAllToAll.apply(dispatched.x_ND, meta.dispatch)
        assert isinstance(x_MD, Tensor)
        y_MD = experts(meta.route.to_experts(x_MD), dispatched.tokens_per_expert_E)
        y_in_flight = IssueAllToAll.apply(meta.route.to_peers(y_MD), meta.combine)
        assert isinstance(y_in_flight, Tensor)
        return y_in_flight

    def receive(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, AsyncMeta)
        y_back = AwaitAllToAll.apply(y_ND, meta.combine)
        assert isinstance(y_back, Tensor)
        return y_back
