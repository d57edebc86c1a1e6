"""SwiGLU expert math over contiguous per-expert row runs: grouped GEMMs, a hand-written backward, in-place gradients.

One forward (:func:`swiglu_forward`) and one backward (:func:`swiglu_backward`) serve
every dispatcher: :class:`GroupedSwiGLU` wraps them for :class:`~moe_trainer.moe.experts.SwiGLUExperts`,
and the overlapped expert-parallel pipeline (:mod:`moe_trainer.parallel.overlap`) calls
them per chunk of experts.

Matmul kernels (:func:`choose_kernels`, chosen once per expert shape, dtype and device, cached):

- ``grouped``: ``torch.nn.functional.grouped_mm`` runs all experts' products in one call
  (CUTLASS on Hopper GPUs in bf16; a C++ loop on CPU, which still saves the Python call
  and the views per expert). It reads the run lengths as int32 cumulative ends on the
  rows' device (:class:`Runs`), so the forward needs no host copy of the counts.
- ``loop``: one ``torch.mm`` per expert, reading the counts on the host (one ``tolist``
  per call). Used where ``grouped_mm`` cannot serve: float64 (refused), widths whose rows
  are not a multiple of 16 bytes (``d_model`` or ``expert_hidden`` times the element size;
  the kernel's stride rule), CUDA outside bf16 (torch's fallback there copies the offsets
  to the host on every call: six syncs per layer instead of the loop's one), or on request
  (``SwiGLUExperts.kernel = "loop"``, the reference the benchmarks compare against).
- weight gradients: ``grouped_mm``'s 2-D x 2-D form (per-expert ``x^T dy``). It can only
  return a fresh weight-sized tensor, which then becomes ``param.grad`` without a copy
  (``Tensor.set_``) when the gradient is replaced; on CUDA it is otherwise added or copied.
  On host memory the fresh tensor is cheap only where freed memory is retained
  (``train.retain_freed_memory``, :func:`moe_trainer.host_memory.retaining`): under glibc's
  default, blocks above 32 MB are mmap'ed and page-fault in every step (measured 19.4 vs
  8.6 ms for 128 experts' ``[128, 128, 512]`` gradient), and adding or casting it is an
  extra pass (10.3 vs 8.8 ms). So on CPU the grouped form serves fp32 gradients that are
  replaced whole with memory retained; the rest (accumulating micro-batches, bf16 products,
  a chunk's slice in the overlapped pipeline, glibc's default allocator) is written per
  expert straight into ``param.grad`` (``torch.mm(out=)`` / ``addmm_``).

Why a hand-written backward: autograd's backward of ``grouped_mm`` fails on a stride-0
upstream gradient (``y.sum().backward()``) and would end in fresh weight-sized gradients
every step; here each weight gradient is written into a buffer that lives as long as the
parameter (:class:`GradBuffer`) and the elementwise parts run once over all rows.

Precision: rows ``x`` in fp32 or bf16, fp32 master weights. Everything computes in
``x.dtype``: the weights are cast once per call (a no-op in fp32) and the cast copies are
kept for the backward (``recompute=False``; casting again would be a second pass over the
fp32 weights) or cast again there (``recompute=True``, which trades compute for memory).
``y`` and ``dx`` come back in ``x.dtype``; weight gradients are accumulated into fp32
``.grad`` (CPU's ``grouped_mm`` refuses ``out_dtype=float32`` for bf16 inputs, so a bf16
product is added into the fp32 gradient, as autocast's ``Linear`` does).

Shape legend: N rows (grouped by expert), D width, F expert hidden width, E local experts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

KERNELS = ("auto", "grouped", "loop")  # SwiGLUExperts.kernel: auto picks grouped where it serves
# glibc mmaps blocks above its dynamic threshold (at most 32 MiB) and unmaps them on free: keep each
# activation of a chunk of experts well under it so the heap recycles it from step to step
HEAP_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class Kernels:
    """Which matmul forms the expert math uses (see the module docstring)."""

    grouped: bool  # forward and input-gradient products through grouped_mm
    grouped_wgrad: bool  # weight gradients through grouped_mm: always on CUDA; on CPU where they can be adopted
    chunk_bytes: int | None = None  # run experts in chunks whose activations stay below this (see expert_chunks)


@functools.cache
def choose_kernels(kernel: str, d_model: int, hidden: int, dtype: torch.dtype, device: torch.device,
                   retained: bool = False, recompute: bool = False) -> Kernels:
    """The kernels for experts of this shape, chosen once and cached (``kernel``: one of :data:`KERNELS`).

    ``retained``: freed host memory is kept (:func:`moe_trainer.host_memory.retaining`);
    ``recompute``: the call keeps only its input rows (``SwiGLUExperts.recompute``).
    """
    if kernel not in KERNELS:
        raise ValueError(f"SwiGLUExperts.kernel={kernel!r}: expected one of {', '.join(KERNELS)}")
    chunk_bytes = host_chunk_bytes(device, retained, recompute)
    if kernel == "loop":
        return Kernels(False, False, chunk_bytes)
    serves = grouped_mm_serves(d_model, hidden, dtype, device)
    if kernel == "grouped" and not serves:
        raise ValueError(f"SwiGLUExperts.kernel='grouped': torch.nn.functional.grouped_mm cannot run experts of "
                         f"d_model={d_model}, expert_hidden={hidden} in {dtype} on {device.type} "
                         "(float64, rows not a multiple of 16 bytes, or no kernel there); use kernel='auto'")
    return Kernels(serves, serves and (device.type == "cuda" or (retained and dtype == torch.float32)), chunk_bytes)


def host_chunk_bytes(device: torch.device, retained: bool, recompute: bool) -> int | None:
    """The bound on a chunk's widest activation (:func:`expert_chunks`), or None for one piece.

    Host memory only. Under glibc's default allocator: pieces it recycles instead of mmap'ing.
    Under recompute, with retained memory too: the hidden activations and their gradients are
    then transients of each backward, whose sizes follow the rows the experts got (twice the
    balanced count and more early in training); whole-call transients of ever new sizes do not
    fit the holes earlier ones left, so the heap grows past them step after step, and its
    high-water mark is the process's peak. Per-chunk transients are bounded and recycled.
    """
    if device.type == "cuda" or (retained and not recompute):
        return None
    return HEAP_CHUNK_BYTES


def grouped_mm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    """``torch.nn.functional.grouped_mm``, or on a torch that predates it the ``torch._grouped_mm`` it wraps.

    Looked up per call (tests patch ``F.grouped_mm``). The project pins one torch, but the GPU check runs
    on whatever torch a borrowed machine has (2.11 there, which has both names), and a torch with only
    the private op must not lose the grouped path for a name.
    """
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


@functools.cache
def grouped_mm_serves(d_model: int, hidden: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``grouped_mm`` runs every product of the expert math at these widths (probed once, tiny tensors)."""
    if device.type == "cuda" and dtype != torch.bfloat16:
        return False
    try:
        offs = torch.tensor([1, 2], dtype=torch.int32, device=device)
        x, h, a = (torch.zeros(2, n, dtype=dtype, device=device) for n in (d_model, 2 * hidden, hidden))
        w_up = torch.zeros(2, d_model, 2 * hidden, dtype=dtype, device=device)
        w_down = torch.zeros(2, hidden, d_model, dtype=dtype, device=device)
        grouped_mm(x, w_up, offs)
        grouped_mm(a, w_down, offs)
        grouped_mm(x, w_down.transpose(1, 2), offs)
        grouped_mm(h, w_up.transpose(1, 2), offs)
        grouped_mm(x.t(), h, offs)
        grouped_mm(a.t(), x, offs)
    except (RuntimeError, NotImplementedError, AttributeError):  # AttributeError: a torch without either name
        return False
    return True


class Runs:
    """How many consecutive rows each expert owns, in the form the kernels read it.

    ``offs_E`` (grouped: int32 cumulative ends, on the rows' device, no host sync) and
    ``counts`` (loop: host list; one ``tolist`` the first time, none if the caller knows
    them already) are derived lazily, each at most once per call.
    """

    def __init__(self, counts_E: Tensor, counts: list[int] | None = None) -> None:
        self.counts_E = counts_E
        self._counts = counts
        self._offs: Tensor | None = None

    @property
    def offs_E(self) -> Tensor:
        if self._offs is None:
            self._offs = torch.cumsum(self.counts_E, 0, dtype=torch.int32)
        return self._offs

    @property
    def counts(self) -> list[int]:
        if self._counts is None:
            self._counts = self.counts_E.tolist()
        return self._counts


def expert_mm(a_NK: Tensor, w_EKM: Tensor, runs: Runs, kernels: Kernels) -> Tensor:
    """``out[run e] = a[run e] @ w[e]`` for every expert's run of rows."""
    if kernels.grouped:
        return grouped_mm(a_NK, w_EKM, runs.offs_E)
    out_NM = a_NK.new_empty(a_NK.shape[0], w_EKM.shape[2])
    for a, w, out in zip(a_NK.split(runs.counts), w_EKM.unbind(0), out_NM.split(runs.counts), strict=True):
        torch.mm(a, w, out=out)
    return out_NM


def expert_weight_grad(a_NK: Tensor, b_NM: Tensor, runs: Runs, kernels: Kernels, grad_EKM: Tensor,
                       overwrite: bool) -> None:
    """``grad[e] (+)= a[run e]^T @ b[run e]`` into the fp32 gradient ``grad_EKM`` (replace when ``overwrite``).

    An expert without rows gets a zero gradient (replaced) or keeps its value (added).
    """
    # adopt: the fresh result becomes the gradient's storage (a whole fp32 tensor being replaced)
    adopt = overwrite and grad_EKM._base is None and grad_EKM.dtype == a_NK.dtype
    if kernels.grouped_wgrad and (adopt or a_NK.device.type == "cuda"):
        g_EKM = grouped_mm(a_NK.t(), b_NM, runs.offs_E)
        if adopt and g_EKM.is_contiguous():
            grad_EKM.set_(g_EKM)  # param.grad (and its GradBuffer) now hold the result: no copy
        elif overwrite:
            grad_EKM.copy_(g_EKM)
        else:
            grad_EKM.add_(g_EKM)
        return
    same = a_NK.dtype == grad_EKM.dtype
    for a_t, b, g in zip(a_NK.t().split(runs.counts, dim=1), b_NM.split(runs.counts), grad_EKM.unbind(0),
                         strict=True):
        if same and overwrite:
            torch.mm(a_t, b, out=g)
        elif same:
            g.addmm_(a_t, b)
        elif overwrite:  # a bf16 product into the fp32 gradient
            g.copy_(torch.mm(a_t, b))
        else:
            g.add_(torch.mm(a_t, b))


class GradBuffer:
    """Hands out ``param.grad`` for in-place writes, reusing one buffer across steps.

    At the start of a backward (:func:`claim_weight_grads`): when the parameter has no gradient (the
    optimizer's ``zero_grad(set_to_none=True)`` ran) the persistent buffer becomes
    ``param.grad`` and the backward overwrites it; otherwise the backward accumulates
    into the existing gradient, as autograd would (micro-batches, several calls).
    Keep a ``clone()`` of a gradient that must survive the next backward.
    """

    def __init__(self) -> None:
        self.buffer: Tensor | None = None

    def target(self, param: Tensor, needed: bool) -> tuple[Tensor | None, bool, bool]:
        """Where this backward writes the gradient: ``(tensor or None, overwrite, returned)``.

        ``returned``: the gradient goes back to autograd as usual (``autograd.grad``, or
        ``backward(inputs=...)`` leaving this parameter out), so it needs a fresh tensor.
        """
        if not needed:
            return None, True, False
        if accumulates_into_grad(param):
            grad, overwrite = self.claim(param)
            return grad, overwrite, False
        return torch.empty_like(param, memory_format=torch.contiguous_format), True, True

    def claim(self, param: Tensor) -> tuple[Tensor, bool]:
        """Returns ``(param.grad, overwrite)``, installing the reused buffer when there is none."""
        if param.grad is not None:
            return param.grad, False
        buf = self.buffer
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype or buf.device != param.device:
            buf = self.buffer = torch.empty_like(param, memory_format=torch.contiguous_format)
        param.grad = buf
        return buf, True


@dataclass(frozen=True)
class WeightGrads:
    """Where one backward writes the two expert weight gradients (gate_up, down)."""

    targets: tuple[Tensor | None, Tensor | None]  # None: that gradient is not needed
    overwrite: tuple[bool, bool]  # replace rather than add (see :meth:`GradBuffer.claim`)
    returned: tuple[bool, bool]  # goes back to autograd (``autograd.grad``) instead of staying in ``.grad``

    def for_autograd(self) -> tuple[Tensor | None, Tensor | None]:
        """What the autograd function returns for the two weights."""
        gate_up, down = (t if r else None for t, r in zip(self.targets, self.returned, strict=True))
        return gate_up, down

    def part(self, first: int, last: int) -> WeightGrads:
        """The same targets restricted to local experts ``first:last`` (a chunk of the overlapped pipeline)."""
        gate_up, down = (None if t is None else t[first:last] for t in self.targets)
        return WeightGrads((gate_up, down), self.overwrite, self.returned)


def claim_weight_grads(sinks: tuple[GradBuffer, GradBuffer], params: tuple[Tensor, Tensor],
                       needed: tuple[bool, bool]) -> WeightGrads:
    """:meth:`GradBuffer.target` for both weights of a backward."""
    (g0, o0, r0), (g1, o1, r1) = (sink.target(p, n) for sink, p, n in zip(sinks, params, needed, strict=True))
    return WeightGrads((g0, g1), (o0, o1), (r0, r1))


def accumulates_into_grad(param: Tensor) -> bool:
    """Whether the running backward will accumulate into ``param.grad`` (a plain ``.backward()``).

    Under ``torch.autograd.grad`` the engine refuses the question for leaves, which answers it.
    """
    try:
        return bool(torch._C._will_engine_execute_node(get_gradient_edge(param).node))
    except RuntimeError:
        return False


def compute_dtype(x_ND: Tensor) -> torch.dtype:
    """The dtype the experts compute in: autocast's when it is on for the rows' device (the rows are cast to it,
    as autocast casts a matmul's inputs), else the rows' own."""
    device = x_ND.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_ND.dtype


@dataclass(frozen=True)
class ExpertCall:
    """What one call of the expert math needs besides rows and weights."""

    kernels: Kernels
    recompute: bool  # keep only the input rows; the backward recomputes h, s, a (and recasts the weights)


@dataclass(frozen=True)
class Saved:
    """What the backward of a run of experts needs from its forward (only ``x_ND`` under recompute)."""

    x_ND: Tensor
    runs: Runs
    weights: tuple[Tensor, Tensor] | None = None  # the weights cast to x's dtype (None: cast again)
    h_NF2: Tensor | None = None  # gate and up pre-activations, side by side
    s_NF: Tensor | None = None  # silu(gate): kept, recomputing it costs an extra pass in the backward
    a_NF: Tensor | None = None  # silu(gate) * up


def cast_weights(w_gate_up_EDF2: Tensor, w_down_EFD: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The weights in the compute dtype: the parameters themselves in fp32, one cast each otherwise."""
    return w_gate_up_EDF2.detach().to(dtype), w_down_EFD.detach().to(dtype)


def _hidden(x_ND: Tensor, w_gate_up: Tensor, runs: Runs, kernels: Kernels,
            keep_s: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """``(h, s, a)``: ``h = x W_gate_up``, ``s = silu(gate)``, ``a = s * up``; without ``keep_s``, ``a`` is
    computed in ``s``'s storage (then the same tensor)."""
    h_NF2 = expert_mm(x_ND, w_gate_up, runs, kernels)
    hidden = h_NF2.shape[1] // 2
    s_NF = F.silu(h_NF2[:, :hidden])
    return h_NF2, s_NF, (s_NF * h_NF2[:, hidden:] if keep_s else s_NF.mul_(h_NF2[:, hidden:]))


def swiglu_forward(x_ND: Tensor, w_gate_up_EDF2: Tensor, w_down_EFD: Tensor, runs: Runs,
                   call: ExpertCall) -> tuple[Tensor, Saved]:
    """``y = (silu(x W_gate) * (x W_up)) W_down`` per expert run, in ``x_ND.dtype``; ``runs``: rows per expert."""
    x_ND = x_ND.contiguous()
    w_gate_up, w_down = cast_weights(w_gate_up_EDF2, w_down_EFD, x_ND.dtype)
    if call.recompute:  # nothing but y survives: a is made in s's storage
        _, _, a_NF = _hidden(x_ND, w_gate_up, runs, call.kernels, keep_s=False)
        return expert_mm(a_NF, w_down, runs, call.kernels), Saved(x_ND, runs)
    h_NF2, s_NF, a_NF = _hidden(x_ND, w_gate_up, runs, call.kernels)
    y_ND = expert_mm(a_NF, w_down, runs, call.kernels)
    return y_ND, Saved(x_ND, runs, (w_gate_up, w_down), h_NF2, s_NF, a_NF)


def swiglu_backward(dy_ND: Tensor, saved: Saved, w_gate_up_EDF2: Tensor, w_down_EFD: Tensor, call: ExpertCall,
                    grads: WeightGrads, need_dx: bool = True) -> Tensor | None:
    """Writes the fp32 weight gradients of these experts into ``grads``; returns ``dx`` in x's dtype (or None)."""
    x_ND, runs, kernels = saved.x_ND, saved.runs, call.kernels
    w_gate_up, w_down = saved.weights or cast_weights(w_gate_up_EDF2, w_down_EFD, x_ND.dtype)
    g_gate_up, g_down = grads.targets
    dy_ND = dy_ND.to(x_ND.dtype).contiguous()  # autograd may hand a stride-0 expanded gradient
    if saved.h_NF2 is None or saved.s_NF is None or saved.a_NF is None:
        dh_NF2 = _hidden_grad_recomputed(x_ND, dy_ND, runs, kernels, w_gate_up, w_down, grads)
    else:
        h_NF2, s_NF, a_NF = saved.h_NF2, saved.s_NF, saved.a_NF
        hidden = s_NF.shape[1]
        da_NF = expert_mm(dy_ND, w_down.transpose(1, 2), runs, kernels)
        if g_down is not None:
            expert_weight_grad(a_NF, dy_ND, runs, kernels, g_down, grads.overwrite[1])
        gate, up = h_NF2[:, :hidden], h_NF2[:, hidden:]
        dh_NF2 = dy_ND.new_empty(dy_ND.shape[0], 2 * hidden)
        torch.ops.aten.silu_backward(da_NF * up, gate, grad_input=dh_NF2[:, :hidden])
        torch.mul(da_NF, s_NF, out=dh_NF2[:, hidden:])
    if g_gate_up is not None:
        expert_weight_grad(x_ND, dh_NF2, runs, kernels, g_gate_up, grads.overwrite[0])
    if not need_dx:
        return None
    return expert_mm(dh_NF2, w_gate_up.transpose(1, 2), runs, kernels)


def _hidden_grad_recomputed(x_ND: Tensor, dy_ND: Tensor, runs: Runs, kernels: Kernels, w_gate_up: Tensor,
                            w_down: Tensor, grads: WeightGrads) -> Tensor:
    """``dh = d(gate, up)`` when the backward rebuilt ``h``, ``s`` and ``a`` (recompute), and ``W_down``'s gradient.

    They belong to this backward alone, so each is overwritten or freed once used up: ``a``
    after ``W_down``'s gradient, and ``dh`` is built in ``h``'s storage. At most ``h``, ``s`` and
    ``da`` live at once (4 ``[N, F]``) instead of ``h``, ``s``, ``a``, ``da``, ``da * up`` and ``dh``
    (8). The same operations on the same values as the path with saved activations: the same bits.
    """
    g_down = grads.targets[1]
    h_NF2, s_NF, a_NF = _hidden(x_ND, w_gate_up, runs, kernels)
    if g_down is not None:
        expert_weight_grad(a_NF, dy_ND, runs, kernels, g_down, grads.overwrite[1])
    del a_NF
    da_NF = expert_mm(dy_ND, w_down.transpose(1, 2), runs, kernels)
    hidden = s_NF.shape[1]
    gate, up = h_NF2[:, :hidden], h_NF2[:, hidden:]
    up.mul_(da_NF)  # da * up: the gate's upstream gradient
    torch.ops.aten.silu_backward(up, gate, grad_input=gate)  # d gate, in place of gate
    torch.mul(da_NF, s_NF, out=up)  # d up
    return h_NF2


@dataclass(frozen=True)
class ExpertChunk:
    """Local experts ``first:last`` and their rows ``rows`` of the call's rows."""

    first: int
    last: int
    rows: slice
    runs: Runs


def expert_chunks(runs: Runs, num_rows: int, num_local: int, row_bytes: int,
                  chunk_bytes: int | None) -> list[ExpertChunk]:
    """Consecutive experts grouped so that a chunk's widest activation (``rows * row_bytes``) stays under
    ``chunk_bytes``; one chunk of everything when it fits or ``chunk_bytes`` is None (then the counts are not
    read on the host).

    Why: one ``[N, 2F]`` tensor over all rows passes glibc's 32 MiB mmap cap at wide experts
    (4096 rows at F = 1024 in fp32), so under the default allocator every step's activations
    are mmap'ed and page-faulted in again; per-chunk pieces come from the heap. An expert
    whose rows alone pass the bound is a chunk of its own.
    """
    if chunk_bytes is None or num_rows * row_bytes <= chunk_bytes:
        return [ExpertChunk(0, num_local, slice(0, num_rows), runs)]
    chunks, first, start, rows = [], 0, 0, 0
    counts = runs.counts
    for e, n in enumerate([*counts, 0]):
        if e == num_local or (rows and (rows + n) * row_bytes > chunk_bytes):
            chunks.append(ExpertChunk(first, e, slice(start, start + rows),
                                      Runs(runs.counts_E[first:e], counts[first:e])))
            first, start, rows = e, start + rows, 0
        rows += n
    return chunks


class GroupedSwiGLU(torch.autograd.Function):
    """Autograd wrapper: ``x`` gets its gradient returned; the weights get theirs written into ``.grad``
    in place under ``.backward()``, and returned as usual under ``torch.autograd.grad``.

    Runs with autocast off: the dtype contract is this module's (compute in ``x.dtype``).
    The experts run in one piece, or in chunks on host memory under glibc's default allocator
    (:func:`expert_chunks`).
    """

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, w_gate_up: Tensor, w_down: Tensor, runs: Runs, call: ExpertCall,
                sinks: tuple[GradBuffer, GradBuffer]) -> Tensor:
        row_bytes = w_gate_up.shape[2] * x_ND.element_size()
        chunks = expert_chunks(runs, x_ND.shape[0], w_down.shape[0], row_bytes, call.kernels.chunk_bytes)
        with torch.autocast(x_ND.device.type, enabled=False):
            if len(chunks) == 1:
                outs = [swiglu_forward(x_ND, w_gate_up, w_down, runs, call)]
            else:
                outs = [swiglu_forward(x_ND[c.rows], w_gate_up[c.first:c.last], w_down[c.first:c.last], c.runs,
                                       call) for c in chunks]
        ctx.chunks, ctx.saved, ctx.call, ctx.sinks = chunks, [s for _, s in outs], call, sinks
        ctx.params = (w_gate_up, w_down)  # the Parameter objects, whose .grad the backward fills
        ctx.save_for_backward(w_gate_up, w_down)  # autograd's check that no step changed them in between
        return outs[0][0] if len(outs) == 1 else torch.cat([y for y, _ in outs])

    @staticmethod
    def backward(ctx: Any, dy_ND: Tensor) -> tuple[Tensor | None, ...]:
        w_gate_up, w_down = ctx.saved_tensors
        grads = claim_weight_grads(ctx.sinks, ctx.params, ctx.needs_input_grad[1:3])
        need_dx = ctx.needs_input_grad[0]
        whole = len(ctx.chunks) == 1
        with torch.autocast(dy_ND.device.type, enabled=False):
            if whole:
                dxs = [swiglu_backward(dy_ND, ctx.saved[0], w_gate_up, w_down, ctx.call, grads, need_dx=need_dx)]
            else:
                dxs = [swiglu_backward(dy_ND[c.rows], saved, w_gate_up[c.first:c.last], w_down[c.first:c.last],
                                       ctx.call, grads.part(c.first, c.last), need_dx=need_dx)
                       for c, saved in zip(ctx.chunks, ctx.saved, strict=True)]
        ctx.saved = ctx.params = ctx.chunks = None
        dx = None if not need_dx else dxs[0] if whole else torch.cat(dxs)  # type: ignore[arg-type]
        return dx, *grads.for_autograd(), None, None, None
