"""Grouped SwiGLU expert math with a hand-written backward that writes weight gradients in place.

Why not autograd: with one matmul pair per expert, autograd's backward for stacked
``[E, ...]`` weights ends in a ``cat`` of E fresh per-expert gradients, a new
weight-sized tensor every step (50 MB per layer at 128 experts of the default size).
Here each expert's weight gradient is written by its matmul straight into a gradient
buffer that lives as long as the parameter (see :class:`GradBuffer`), and the
elementwise parts run once over all rows instead of once per expert.

The functions take a range of local experts so a pipelined caller can run one chunk of
experts at a time (see :mod:`moe_trainer.parallel.overlap`).

Shape legend: N rows (grouped by expert), D width, F expert hidden width, E local experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.graph import get_gradient_edge


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


def write_matmul(out: Tensor, a: Tensor, b: Tensor, overwrite: bool) -> None:
    """``out = a @ b`` or ``out += a @ b`` without a temporary (one when bf16 lands in an fp32 gradient)."""
    if out.dtype != a.dtype:  # bf16 rows, fp32 master gradient (minimal form until the grouped kernel)
        product = torch.mm(a, b)
        out.copy_(product) if overwrite else out.add_(product)
    elif overwrite:
        torch.mm(a, b, out=out)
    else:
        out.addmm_(a, b)


@dataclass(frozen=True)
class Saved:
    """What the backward of a run of experts needs from its forward."""

    x_ND: Tensor
    h_NF2: Tensor  # gate and up pre-activations, side by side
    s_NF: Tensor  # silu(gate): kept, recomputing it costs an extra pass in the backward
    a_NF: Tensor  # silu(gate) * up


def swiglu_forward(x_ND: Tensor, w_gate_up_EDF2: Tensor, w_down_EFD: Tensor, counts: list[int]) -> tuple[Tensor, Saved]:
    """``y = (silu(x W_gate) * (x W_up)) W_down`` per expert run; ``counts[e]`` rows for expert ``e``.

    Per expert only the matmul runs in Python; views come from one ``split`` each (at 128
    experts per-expert slicing cost as much as the small matmuls' own overhead).
    Computes in the dtype of ``x_ND`` (fp32 master weights are cast once per call).
    """
    w_gate_up_EDF2, w_down_EFD = w_gate_up_EDF2.to(x_ND.dtype), w_down_EFD.to(x_ND.dtype)
    hidden = w_down_EFD.shape[1]
    h_NF2 = x_ND.new_empty(x_ND.shape[0], 2 * hidden)
    for x, w, out in zip(x_ND.split(counts), w_gate_up_EDF2.unbind(0), h_NF2.split(counts), strict=True):
        torch.mm(x, w, out=out)
    s_NF = F.silu(h_NF2[:, :hidden])
    a_NF = s_NF * h_NF2[:, hidden:]
    y_ND = x_ND.new_empty(x_ND.shape[0], w_down_EFD.shape[2])
    for a, w, out in zip(a_NF.split(counts), w_down_EFD.unbind(0), y_ND.split(counts), strict=True):
        torch.mm(a, w, out=out)
    return y_ND, Saved(x_ND, h_NF2, s_NF, a_NF)


def swiglu_backward(dy_ND: Tensor, saved: Saved, w_gate_up_EDF2: Tensor, w_down_EFD: Tensor, counts: list[int],
                    grads: tuple[Tensor | None, Tensor | None], overwrite: tuple[bool, bool],
                    need_dx: bool = True) -> Tensor | None:
    """Writes the weight gradients of these experts into ``grads`` (gate_up, down; None = not needed).

    ``overwrite[i]``: replace rather than add to ``grads[i]`` (see :meth:`GradBuffer.claim`).
    Returns ``dx`` (None unless ``need_dx``), in the dtype of ``dy_ND``.
    """
    w_gate_up_EDF2, w_down_EFD = w_gate_up_EDF2.to(dy_ND.dtype), w_down_EFD.to(dy_ND.dtype)
    hidden = w_down_EFD.shape[1]
    g_gate_up, g_down = grads
    dy_ND = dy_ND.contiguous()
    dy_runs = dy_ND.split(counts)
    da_NF = dy_ND.new_empty(dy_ND.shape[0], hidden)
    for dy, w_t, out in zip(dy_runs, w_down_EFD.transpose(1, 2).unbind(0), da_NF.split(counts), strict=True):
        torch.mm(dy, w_t, out=out)
    if g_down is not None:
        for a_t, dy, g in zip(saved.a_NF.t().split(counts, dim=1), dy_runs, g_down.unbind(0), strict=True):
            write_matmul(g, a_t, dy, overwrite[1])
    gate, up = saved.h_NF2[:, :hidden], saved.h_NF2[:, hidden:]
    dh_NF2 = dy_ND.new_empty(dy_ND.shape[0], 2 * hidden)
    torch.ops.aten.silu_backward(da_NF * up, gate, grad_input=dh_NF2[:, :hidden])
    torch.mul(da_NF, saved.s_NF, out=dh_NF2[:, hidden:])
    dh_runs = dh_NF2.split(counts)
    if g_gate_up is not None:
        for x_t, dh, g in zip(saved.x_ND.t().split(counts, dim=1), dh_runs, g_gate_up.unbind(0), strict=True):
            write_matmul(g, x_t, dh, overwrite[0])
    if not need_dx:
        return None
    dx_ND = dy_ND.new_empty(dy_ND.shape[0], w_gate_up_EDF2.shape[1])
    for dh, w_t, out in zip(dh_runs, w_gate_up_EDF2.transpose(1, 2).unbind(0), dx_ND.split(counts), strict=True):
        torch.mm(dh, w_t, out=out)
    return dx_ND


class GroupedSwiGLU(torch.autograd.Function):
    """Autograd wrapper: ``x`` gets its gradient returned; the weights get theirs written into ``.grad``
    in place under ``.backward()``, and returned as usual under ``torch.autograd.grad``."""

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: list[int],
                sinks: tuple[GradBuffer, GradBuffer]) -> Tensor:
        y_ND, saved = swiglu_forward(x_ND, w_gate_up, w_down, counts)
        ctx.saved, ctx.counts, ctx.sinks = saved, counts, sinks
        ctx.params = (w_gate_up, w_down)  # the Parameter objects, whose .grad the backward fills
        ctx.save_for_backward(w_gate_up, w_down)  # autograd's check that no step changed them in between
        return y_ND

    @staticmethod
    def backward(ctx: Any, dy_ND: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None, None, None]:
        w_gate_up, w_down = ctx.saved_tensors
        grads = claim_weight_grads(ctx.sinks, ctx.params, ctx.needs_input_grad[1:3])
        dx = swiglu_backward(dy_ND, ctx.saved, w_gate_up, w_down, ctx.counts, grads.targets, grads.overwrite,
                             need_dx=ctx.needs_input_grad[0])
        ctx.saved = ctx.params = None
        return dx, *grads.for_autograd(), None, None
