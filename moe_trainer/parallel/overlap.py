"""Expert parallelism with the all-to-alls overlapped with expert compute (``parallel.a2a_chunks``).

Each rank's local experts are cut into C chunks of consecutive experts. Rows are
gathered in chunk-major order (chunk, peer, expert), so chunk c's rows for every peer
are one contiguous slice, and the pipeline runs, per MoE layer:

    forward:  send(0); for c: send(c+1); wait(c); experts(c); return(c)     then wait all returns
    backward: send grads(0); for c: send grads(c+1); wait(c); expert backward(c); return grads(c)

so while chunk c's experts compute, chunk c+1's rows and chunk c-1's results are on
the wire (asynchronous ``all_to_all_single``; gloo and NCCL progress them in their own
threads/streams). Routing, capacity and drops come from the same plan as without
overlap, so the loss curve is the same (``a2a_chunks=1``: the plain
:class:`~moe_trainer.parallel.dispatcher.AllToAllTransport`). Communication time
counted in telemetry is the time a rank waits for a transfer, i.e. the exposed part.

Shape legend: T tokens, D width, E global experts, L local experts, P ranks, N rows.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from moe_trainer.moe.dispatcher import Dispatched, DispatchPlan
from moe_trainer.moe.expert_kernels import ExpertCall, Runs, Saved, claim_weight_grads, swiglu_backward, swiglu_forward
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.parallel.comm import AsyncWire
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.protocol import regroup_index
from moe_trainer.parallel.telemetry import CommCounters


@dataclass(frozen=True)
class Chunk:
    """One chunk of local experts: what moves where, seen from this rank."""

    first: int  # first local expert of the chunk
    last: int  # one past its last local expert
    src_offset: int  # where the chunk's rows start in the chunk-major source rows
    send_splits: list[int]  # rows this rank sends each peer (forward dispatch)
    recv_splits: list[int]  # rows this rank receives from each peer
    counts_L: Tensor  # rows per local expert of the chunk, once regrouped (stays on the device)
    regroup_idx: Tensor  # received (peer, expert) order -> (expert, peer) order

    @property
    def src_rows(self) -> int:
        return sum(self.send_splits)

    @property
    def recv_rows(self) -> int:
        return sum(self.recv_splits)


def chunk_bounds(num_local: int, chunks: int) -> list[tuple[int, int]]:
    """``chunks`` ranges of consecutive local experts, sizes differing by at most one."""
    edges = [round(i * num_local / chunks) for i in range(chunks + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def chunk_major_order(tokens_per_expert_E: Tensor, num_local: int, bounds: list[tuple[int, int]],
                      rows: int) -> Tensor:
    """Permutation of plan rows (sorted by global expert) into (chunk, peer, expert) order.

    Built on the counts' device; ``rows`` (the plan's row count) fixes the expanded length,
    so no device read is needed.
    """
    device = tokens_per_expert_E.device
    chunk_of_local = torch.cat([torch.full((last - first,), c, dtype=torch.long, device=device)
                                for c, (first, last) in enumerate(bounds)])
    experts = torch.arange(tokens_per_expert_E.numel(), device=device)
    chunk_N = chunk_of_local[experts.remainder(num_local)].repeat_interleave(tokens_per_expert_E, output_size=rows)
    return torch.argsort(chunk_N, stable=True)


def plan_chunks(send_counts_PL: Tensor, recv_counts_PL: Tensor, bounds: list[tuple[int, int]]) -> list[Chunk]:
    """Each chunk's split sizes and run lengths: split sizes read from the device at once (one host sync),
    run lengths left on it for the grouped experts."""
    sums = [torch.stack([send_counts_PL[:, first:last].sum(1), recv_counts_PL[:, first:last].sum(1)])
            for first, last in bounds]
    host = torch.stack(sums).flatten().tolist()  # [C, 2, P]; run lengths stay on the device
    peers = send_counts_PL.shape[0]
    chunks, offset = [], 0
    for c, (first, last) in enumerate(bounds):
        send_splits = host[2 * peers * c:2 * peers * c + peers]
        recv_splits = host[2 * peers * c + peers:2 * peers * (c + 1)]
        recv_part = recv_counts_PL[:, first:last]
        chunks.append(Chunk(first, last, offset, send_splits, recv_splits, recv_part.sum(0),
                            regroup_index(recv_part, sum(recv_splits))))
        offset += sum(send_splits)
    return chunks


def _exchange_and_compute(x_ND: Tensor, chunks: list[Chunk], wire: AsyncWire, phases: tuple[str, str],
                          compute: Any) -> Tensor:
    """The pipeline shared by forward and backward: rows out to the owners, ``compute``, results back.

    ``compute(c, rows_in_expert_order) -> rows_in_expert_order`` runs chunk ``c``'s experts.
    """
    out_ND = torch.empty_like(x_ND)
    recv = [x_ND.new_empty(c.recv_rows, x_ND.shape[1]) for c in chunks]

    def send(i: int) -> Any:
        c = chunks[i]
        return wire.start(recv[i], x_ND[c.src_offset:c.src_offset + c.src_rows], c.recv_splits, c.send_splits,
                          phases[0])

    in_flight = send(0)
    returns = []
    for i, c in enumerate(chunks):
        following = send(i + 1) if i + 1 < len(chunks) else None
        wire.wait(in_flight, phases[0], x_ND.device)
        result = compute(i, recv[i].index_select(0, c.regroup_idx))
        if result is not None:
            back = torch.empty_like(result).index_copy_(0, c.regroup_idx, result)
            dest = out_ND[c.src_offset:c.src_offset + c.src_rows]
            returns.append((wire.start(dest, back, c.send_splits, c.recv_splits, phases[1]), back))
        recv[i] = x_ND.new_empty(0)  # let the received rows go once the experts have them
        in_flight = following
    for work, _ in returns:  # ``back`` stays referenced until its transfer is done
        wire.wait(work, phases[1], x_ND.device)
    return out_ND


class OverlappedExperts(torch.autograd.Function):
    """Dispatch all-to-all, local experts and combine all-to-all of one MoE layer, pipelined by chunk."""

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, w_gate_up: Tensor, w_down: Tensor, chunks: list[Chunk], wire: AsyncWire,
                experts: SwiGLUExperts, call: ExpertCall) -> Tensor:
        saved: list[Saved | None] = []

        def compute(i: int, rows: Tensor) -> Tensor:
            c = chunks[i]
            y, s = swiglu_forward(rows, w_gate_up[c.first:c.last], w_down[c.first:c.last], Runs(c.counts_L), call)
            saved.append(s)
            return y

        with torch.autocast(x_ND.device.type, enabled=False):
            y_ND = _exchange_and_compute(x_ND.contiguous(), chunks, wire, ("dispatch", "combine"), compute)
        ctx.chunks, ctx.wire, ctx.saved, ctx.experts, ctx.call = chunks, wire, saved, experts, call
        ctx.params = (w_gate_up, w_down)
        ctx.save_for_backward(w_gate_up, w_down)
        return y_ND

    @staticmethod
    def backward(ctx: Any, dy_ND: Tensor) -> tuple[Tensor | None, ...]:
        w_gate_up, w_down = ctx.saved_tensors
        grads = claim_weight_grads(ctx.experts.grad_sinks, ctx.params, ctx.needs_input_grad[1:3])
        chunks, saved, call = ctx.chunks, ctx.saved, ctx.call
        need_dx = ctx.needs_input_grad[0]

        def compute(i: int, dy: Tensor) -> Tensor | None:
            c = chunks[i]
            part = slice(c.first, c.last)
            chunk_saved = saved[i]
            assert chunk_saved is not None
            dx = swiglu_backward(dy, chunk_saved, w_gate_up[part], w_down[part], call, grads.part(c.first, c.last),
                                 need_dx=need_dx)
            saved[i] = None  # activations of a finished chunk can go
            return dx

        with torch.autocast(dy_ND.device.type, enabled=False):
            dx_ND = _exchange_and_compute(dy_ND.contiguous(), chunks, ctx.wire, ("combine_bwd", "dispatch_bwd"),
                                          compute)
        ctx.saved = ctx.params = ctx.experts = None
        return (dx_ND if need_dx else None, *grads.for_autograd(), None, None, None, None)


@dataclass(frozen=True)
class OverlapMeta:
    chunks: list[Chunk]
    layer: int


class ChunkedAllToAllTransport(AllToAllTransport):
    """:class:`AllToAllTransport` whose rows travel in ``chunks`` pieces overlapped with the experts.

    Expert parallelism only (every rank of the group owns experts). The plan's rows travel
    chunk-major; ``send`` exchanges counts but moves no rows; :meth:`run_experts` does the
    exchange and the experts together; ``receive`` has nothing left to do.
    """

    def __init__(self, group: Any, group_size: int, group_rank: int, num_experts: int, chunks: int,
                 counters: CommCounters | None = None) -> None:
        super().__init__(group, group_size, group_rank, num_experts, counters)
        self.bounds = chunk_bounds(self.experts_per_owner, chunks)

    def order(self, plan: DispatchPlan) -> DispatchPlan:
        order = chunk_major_order(plan.tokens_per_expert_E, self.experts_per_owner, self.bounds,
                                  plan.token_idx_N.numel())
        return replace(plan, token_idx_N=plan.token_idx_N[order], weight_N=plan.weight_N[order])

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        x_ND, recv_counts_PL = self.permute_while_counting(x_TD, plan, layer)
        chunks = plan_chunks(plan.tokens_per_expert_E.view(self.group_size, -1), recv_counts_PL, self.bounds)
        return x_ND, recv_counts_PL.sum(0), OverlapMeta(chunks, layer)

    def run_experts(self, experts: SwiGLUExperts, dispatched: Dispatched) -> Tensor:
        meta = dispatched.comm
        assert isinstance(meta, OverlapMeta)
        wire = AsyncWire(self.group, self.group_rank, self.counters, meta.layer)
        x_ND, call = experts.call_for(dispatched.x_ND)  # rows travel in the compute dtype
        y_ND = OverlappedExperts.apply(x_ND, experts.w_gate_up_EDF2, experts.w_down_EFD, meta.chunks, wire, experts,
                                       call)
        assert isinstance(y_ND, Tensor)
        return y_ND

    def receive(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        return y_ND
