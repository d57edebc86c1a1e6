"""Point-to-point transport between coordinators and expert actors, and the coordinators' autograd pair.

Why not all-to-alls: an all-to-all is a collective, so every rank waits in it for every
other. With coordinators that only send rows and expert actors that only send results,
the traffic of each phase is one-directional, and asynchronous sends let both roles
run on: a coordinator hands micro-batch i to the experts and goes on with micro-batch
i+1's attention; an expert actor receives micro-batch i+1 while it computes i and
returns each result as soon as it is ready.

Every message from a coordinator to an expert actor is a header (:func:`~moe_trainer.parallel.protocol.header`:
phase, key, rows per local expert) followed by the rows when there are any. Replies (results, input
gradients) need no header: the coordinator knows their sizes and posts their receives when it sends
the request. Between one pair of ranks, messages match in the order they were posted (gloo matches
in posting order for one tag; NCCL has no tags and matches in order), so both sides post in one order.

gloo sends complete only once the peer posted the matching receive: the expert actors post the
next header's receive as soon as the current rows' receive is posted
(:class:`~moe_trainer.parallel.disaggregated.Inbox`), and coordinators post every reply's receive
when they send the request.

Shape legend: N rows sent by this coordinator, D width, X expert actors, L local experts per actor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from moe_trainer.parallel.comm import dist, guarded
from moe_trainer.parallel.protocol import BACKWARD, header
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import Span, mark


@dataclass(frozen=True)
class Lanes:
    """The process groups of the two directions (every rank is in both): requests to expert actors, replies back."""

    requests: Any
    replies: Any


def peer_slices(t_ND: Tensor, peers: list[int], rows: list[int]) -> list[tuple[int, Tensor]]:
    """``(peer, its consecutive rows of t)`` for every peer with rows: what one message sends or receives per peer."""
    out, start = [], 0
    for peer, n in zip(peers, rows, strict=True):
        if n:
            out.append((peer, t_ND[start:start + n]))
        start += n
    return out


@dataclass
class Posted:
    """Sends and receives in flight; tensors stay referenced until their work is done."""

    works: list[tuple[Any, str]] = field(default_factory=list)
    held: list[Tensor] = field(default_factory=list)

    def send(self, tensor: Tensor, peer: int, group: Any, label: str) -> None:
        self.works.append((guarded(label, lambda: dist.isend(tensor, peer, group=group)), label))
        self.held.append(tensor)

    def recv(self, tensor: Tensor, peer: int, group: Any, label: str) -> None:
        self.works.append((guarded(label, lambda: dist.irecv(tensor, peer, group=group)), label))
        self.held.append(tensor)

    def done(self) -> bool:
        return all(work.is_completed() for work, _ in self.works)

    def reap(self) -> None:
        """Lets go of the work and tensors of operations already completed (never waits)."""
        pending = [(op, tensor) for op, tensor in zip(self.works, self.held, strict=True) if not op[0].is_completed()]
        self.works, self.held = [op for op, _ in pending], [tensor for _, tensor in pending]

    def wait(self) -> None:
        for work, label in self.works:
            guarded(f"{label} (wait)", work.wait)
        self.works, self.held = [], []


@dataclass
class Trip:
    """One dispatch of one coordinator to the expert actors and back, forward and backward.

    ``rows[x]``: rows this coordinator sends expert actor ``x`` (consecutive in the plan's
    order, since actors own consecutive experts); ``counts_XL``: per local expert, for the headers.
    """

    peers: list[int]  # global ranks of the expert actors
    rows: list[int]
    counts_XL: Tensor
    key: int  # running number of this dispatch on this coordinator (the same on every coordinator)
    layer: int
    lanes: Lanes
    counters: CommCounters
    sends: Posted = field(default_factory=Posted)
    replies: Posted = field(default_factory=Posted)
    input_grad: Tensor | None = None  # backward: the buffer the input gradients land in

    def request(self, phase: int, payload_ND: Tensor, what: str) -> Tensor:
        """Sends the headers and rows of ``phase``, posts the replies' receives; returns their (unfilled) buffer."""
        t0 = mark(payload_ND.device)
        headers = header(phase, self.key, self.layer, self.counts_XL)
        payload_ND = payload_ND.contiguous()
        label = f"send of {what} rows to the expert actors, MoE block {self.layer}"
        for x, peer in enumerate(self.peers):
            self.sends.send(headers[x], peer, self.lanes.requests, label)
        for peer, part in peer_slices(payload_ND, self.peers, self.rows):
            self.sends.send(part, peer, self.lanes.requests, label)
        reply = torch.empty_like(payload_ND)
        recv_label = f"receive of {what} replies from the expert actors, MoE block {self.layer}"
        for peer, part in peer_slices(reply, self.peers, self.rows):
            self.replies.recv(part, peer, self.lanes.replies, recv_label)
        phase_name = "combine_bwd" if phase == BACKWARD else "dispatch"
        self.counters.add(phase_name, sum(self.rows), 0, payload_ND.shape[1] * payload_ND.element_size(),
                          Span.since(t0, payload_ND.device))
        return reply

    def land(self, phase_name: str, reply: Tensor) -> Tensor:
        """Waits for the replies posted by :meth:`request` (the exposed part of the round trip), then for its sends.

        Once the replies are in, the rows' sends are done; a header-only send (an expert actor
        that got no rows) may still wait for that actor to post its receive. Waiting here keeps
        every send's work and tensors alive until it completes (a gloo send whose work is dropped
        may never be delivered) and frees the sent rows now instead of at backward.
        """
        t0 = mark(reply.device)
        self.replies.wait()
        self.sends.wait()
        self.counters.add(phase_name, 0, sum(self.rows), reply.shape[1] * reply.element_size(),
                          Span.since(t0, reply.device))
        return reply


class SendToExperts(torch.autograd.Function):
    """Forward: sends the rows and returns the (still empty) buffer their results will land in.

    Backward: waits for the input gradients :class:`LandFromExperts` asked for and returns them.
    """

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, trip: Trip, phase: int) -> Tensor:
        ctx.trip = trip
        return trip.request(phase, x_ND, "token")

    @staticmethod
    def backward(ctx: Any, _grad: Tensor) -> tuple[Tensor, None, None]:
        trip: Trip = ctx.trip
        assert trip.input_grad is not None, "LandFromExperts.backward asks for the input gradients first"
        dx_ND = trip.land("dispatch_bwd", trip.input_grad)
        trip.input_grad = ctx.trip = None
        return dx_ND, None, None


class LandFromExperts(torch.autograd.Function):
    """Forward: waits for the results :class:`SendToExperts` asked for.

    Backward: sends their gradients to the expert actors and returns at once, so the
    autograd engine runs other nodes while the experts' backward runs remotely.
    """

    @staticmethod
    def forward(ctx: Any, reply_ND: Tensor, trip: Trip) -> Tensor:
        ctx.trip = trip
        return trip.land("combine", reply_ND)

    @staticmethod
    def backward(ctx: Any, grad_ND: Tensor) -> tuple[Tensor, None]:
        trip: Trip = ctx.trip
        trip.input_grad = trip.request(BACKWARD, grad_ND, "gradient")
        ctx.trip = None
        return grad_ND, None
