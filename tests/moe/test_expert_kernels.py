"""The expert kernels (grouped GEMM and loop) and their hand-written backward against plain autograd.

The reference is a per-expert loop of ordinary ops in float64 run through autograd; the
experts under test keep fp32 master weights and take fp32 or bf16 rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_trainer.moe import expert_kernels
from moe_trainer.moe.expert_kernels import choose_kernels
from moe_trainer.moe.experts import SwiGLUExperts, bucketed, padded_rows
from moe_trainer.parallel.overlap import OverlappedExperts, chunk_bounds, plan_chunks
from tests.helpers import assert_rel_close

COUNTS = [3, 0, 7, 1, 4]  # an expert with no rows on purpose
D, H = 16, 24
# fp32: a few ulps of accumulated rounding; bf16: 8 mantissa bits through three products
REL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def reference(experts: SwiGLUExperts, x: Tensor, dy: Tensor, counts: list[int]) -> tuple[Tensor, list[Tensor]]:
    """Plain autograd in float64 on copies of the weights: ``y`` and the gradients of x, gate_up, down."""
    x64 = x.detach().double().requires_grad_(True)
    w_gu = experts.w_gate_up_EDF2.detach().double().requires_grad_(True)
    w_down = experts.w_down_EFD.detach().double().requires_grad_(True)
    outs = []
    for x_n, gu, down in zip(x64.split(counts), w_gu.unbind(0), w_down.unbind(0), strict=True):
        gate, up = (x_n @ gu).split(H, dim=-1)
        outs.append((F.silu(gate) * up) @ down)
    y = torch.cat(outs)
    return y.detach(), list(torch.autograd.grad(y, [x64, w_gu, w_down], dy.double()))


def make(kernel: str = "auto", recompute: bool = False, counts: list[int] = COUNTS,
         dtype: torch.dtype = torch.float32) -> tuple[SwiGLUExperts, Tensor, Tensor]:
    torch.manual_seed(0)
    experts = SwiGLUExperts(len(counts), D, H)
    experts.kernel, experts.recompute = kernel, recompute
    x = torch.randn(sum(counts), D).to(dtype).requires_grad_(True)
    return experts, x, torch.randn(sum(counts), D).to(dtype)


def params(experts: SwiGLUExperts) -> list[Tensor]:
    return [experts.w_gate_up_EDF2, experts.w_down_EFD]


def run(experts: SwiGLUExperts, x: Tensor, dy: Tensor, counts: list[int] = COUNTS) -> tuple[Tensor, list[Tensor]]:
    y = experts(x, torch.tensor(counts))
    y.backward(dy)
    assert x.grad is not None
    return y.detach(), [x.grad, *(p.grad for p in params(experts) if p.grad is not None)]


def test_kernels_are_chosen_once_by_what_grouped_mm_serves() -> None:
    cpu = torch.device("cpu")
    assert choose_kernels("auto", D, H, torch.float32, cpu).grouped
    assert not choose_kernels("auto", D, H, torch.float32, cpu).grouped_wgrad  # glibc's default: faults
    assert choose_kernels("auto", D, H, torch.float32, cpu, retained=True).grouped_wgrad
    assert not choose_kernels("auto", D, H, torch.bfloat16, cpu, retained=True).grouped_wgrad  # a cast pass
    assert choose_kernels("auto", D, H, torch.bfloat16, cpu).grouped
    assert not choose_kernels("auto", D, H, torch.float64, cpu).grouped  # grouped_mm refuses float64
    assert not choose_kernels("auto", 10, H, torch.float32, cpu).grouped  # 40-byte rows: not 16-byte aligned
    assert not choose_kernels("loop", D, H, torch.float32, cpu).grouped
    with pytest.raises(ValueError, match="kernel='grouped'.*float64"):
        choose_kernels("grouped", D, H, torch.float64, cpu)
    with pytest.raises(ValueError, match="kernel='fast'"):
        choose_kernels("fast", D, H, torch.float32, cpu)
    assert choose_kernels("auto", D, H, torch.float32, cpu) is choose_kernels("auto", D, H, torch.float32, cpu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_forward_and_every_gradient_match_plain_autograd(kernel: str, dtype: torch.dtype) -> None:
    experts, x, dy = make(kernel, dtype=dtype)
    y, grads = run(experts, x, dy)
    want_y, want = reference(experts, x, dy, COUNTS)
    assert y.dtype == dtype and grads[0].dtype == dtype  # y and dx in the rows' dtype
    assert all(g.dtype == torch.float32 for g in grads[1:])  # weight gradients in fp32, like the master weights
    assert_rel_close(y, want_y, REL[dtype], "y")
    for name, g, w in zip(["dx", "d gate_up", "d down"], grads, want, strict=True):
        assert_rel_close(g, w, REL[dtype], name)
    for p in params(experts):  # the expert with no rows gets an exact zero gradient
        assert p.grad is not None and not p.grad[1].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_equals_loop(dtype: torch.dtype) -> None:
    """Both kernels run the same products (torch's CPU grouped_mm loops over mm in C++): equal to rounding."""
    got = [run(*make(kernel, dtype=dtype)) for kernel in ("grouped", "loop")]
    (y_g, grads_g), (y_l, grads_l) = got
    assert_rel_close(y_g, y_l, 1e-6, "y")
    for g, w in zip(grads_g, grads_l, strict=True):
        assert_rel_close(g, w, 1e-6, "gradient")


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_all_experts_empty(kernel: str) -> None:
    experts, x, dy = make(kernel, counts=[0, 0, 0])
    y, grads = run(experts, x, dy, [0, 0, 0])
    assert y.shape == (0, D) and grads[0].shape == (0, D)
    assert all(g.shape == p.shape and not g.any() for g, p in zip(grads[1:], params(experts), strict=True))


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_gradients_accumulate_over_micro_batches_into_existing_grad(kernel: str) -> None:
    experts, x, dy = make(kernel)
    counts = torch.tensor(COUNTS)
    x2 = torch.randn_like(x).requires_grad_(True)
    want = [reference(experts, a, dy, COUNTS)[1] for a in (x, x2)]
    experts(x, counts).backward(dy)
    first = [p.grad.clone() for p in params(experts) if p.grad is not None]
    experts(x2, counts).backward(dy)  # a second micro-batch adds, as autograd does
    for p, g1, w1, w2 in zip(params(experts), first, want[0][1:], want[1][1:], strict=True):
        assert_rel_close(g1, w1, REL[torch.float32], "first micro-batch")
        assert_rel_close(p.grad, w1 + w2, REL[torch.float32], "sum of both micro-batches")


def test_weight_gradient_buffer_is_reused_across_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moe_trainer.moe.experts.retaining", lambda: False)  # written in place, per expert
    experts, x, dy = make()
    counts = torch.tensor(COUNTS)
    experts(x, counts).backward(dy)
    first = experts.w_gate_up_EDF2.grad
    assert first is not None
    kept = first.clone()
    experts.zero_grad(set_to_none=True)
    experts(x, counts).backward(2 * dy)
    again = experts.w_gate_up_EDF2.grad
    assert again is not None and again.data_ptr() == first.data_ptr()  # no new weight-sized allocation
    torch.testing.assert_close(again, 2 * kept)  # overwritten, not added to the stale values


@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_autograd_grad_returns_weight_gradients(kernel: str) -> None:
    experts, x, dy = make(kernel)
    want = reference(experts, x, dy, COUNTS)[1]
    got = torch.autograd.grad(experts(x, torch.tensor(COUNTS)), [x, *params(experts)], dy)
    for name, g, w in zip(["dx", "d gate_up", "d down"], got, want, strict=True):
        assert_rel_close(g, w, REL[torch.float32], name)
    assert all(p.grad is None for p in params(experts))  # autograd.grad never touches .grad


def test_backward_inputs_leaves_weights_alone() -> None:
    experts, x, dy = make()
    experts(x, torch.tensor(COUNTS)).backward(dy, inputs=[x])
    assert x.grad is not None and all(p.grad is None for p in params(experts))


def test_stride_zero_upstream_gradient() -> None:
    """``y.sum().backward()`` hands an expanded stride-0 gradient, which grouped_mm's own backward refuses."""
    experts, x, _ = make("grouped")
    experts(x, torch.tensor(COUNTS)).sum().backward()
    want = reference(experts, x, torch.ones(sum(COUNTS), D), COUNTS)[1]
    assert x.grad is not None
    assert_rel_close(x.grad, want[0], REL[torch.float32], "dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_recompute_gives_identical_gradients(kernel: str, dtype: torch.dtype) -> None:
    y_keep, grads_keep = run(*make(kernel, recompute=False, dtype=dtype))
    y_re, grads_re = run(*make(kernel, recompute=True, dtype=dtype))
    assert torch.equal(y_keep, y_re)
    assert all(torch.equal(a, b) for a, b in zip(grads_keep, grads_re, strict=True))


def test_recompute_keeps_only_the_input_rows() -> None:
    experts, x, _ = make("grouped", recompute=True)
    y = experts(x, torch.tensor(COUNTS))
    (saved,) = y.grad_fn.saved  # type: ignore[union-attr]
    assert saved.x_ND is x and saved.h_NF2 is None and saved.s_NF is None and saved.a_NF is None
    assert saved.weights is None


def test_grouped_forward_reads_counts_on_the_device(monkeypatch: pytest.MonkeyPatch) -> None:
    experts, x, _ = make("grouped")
    counts = torch.tensor(COUNTS)
    calls = []
    grouped_mm = F.grouped_mm
    monkeypatch.setattr(expert_kernels.F, "grouped_mm", lambda *a, **k: calls.append(1) or grouped_mm(*a, **k))
    with monkeypatch.context() as m:
        for name in ("tolist", "item", "cpu"):
            m.setattr(torch.Tensor, name, lambda *_a, **_k: pytest.fail("host copy of the counts in the forward"))
        experts(x, counts)
    assert len(calls) == 2  # both forward products went through grouped_mm


def test_autocast_computes_in_its_dtype() -> None:
    experts, x, dy = make("grouped")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts(x, torch.tensor(COUNTS))
    assert y.dtype == torch.bfloat16
    y.backward(dy.bfloat16())
    assert x.grad is not None and x.grad.dtype == torch.float32  # through the cast back to the leaf's dtype
    assert experts.w_down_EFD.grad is not None and experts.w_down_EFD.grad.dtype == torch.float32
    assert_rel_close(x.grad, reference(experts, x, dy, COUNTS)[1][0], REL[torch.bfloat16], "dx")


class LoopbackWire:
    """A one-rank all-to-all: the rows arrive as sent (the overlapped pipeline without a process group)."""

    def start(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], phase: str) -> None:
        out.copy_(inp)

    def wait(self, work: Any, phase: str, device: torch.device) -> None:
        pass


@pytest.mark.parametrize("recompute", [False, True], ids=["keep", "recompute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_overlapped_pipeline_runs_the_same_expert_function(dtype: torch.dtype, recompute: bool) -> None:
    """Two chunks of experts through :class:`OverlappedExperts` give what the experts give in one call."""
    want_y, want = run(*make("grouped", dtype=dtype))
    experts, x, dy = make("grouped", recompute=recompute, dtype=dtype)
    counts_PL = torch.tensor([COUNTS])
    chunks = plan_chunks(counts_PL, counts_PL, chunk_bounds(len(COUNTS), 2))
    y = OverlappedExperts.apply(x, *params(experts), chunks, LoopbackWire(), experts,
                                experts.call_for(x)[1])
    y.backward(dy)
    assert torch.equal(y.detach(), want_y)
    got = [x.grad, *(p.grad for p in params(experts))]
    assert all(g is not None and torch.equal(g, w) for g, w in zip(got, want, strict=True))


@pytest.fixture
def retained(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in the trainer with ``train.retain_freed_memory=true``: fresh weight-sized tensors are cheap."""
    monkeypatch.setattr("moe_trainer.moe.experts.retaining", lambda: True)


@pytest.mark.usefixtures("retained")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_grouped_weight_gradients_with_retained_memory(dtype: torch.dtype) -> None:
    """fp32: the 2-D x 2-D grouped product becomes ``.grad`` (replaced), then the next backward adds per expert."""
    experts, x, dy = make("grouped", dtype=dtype)
    assert experts.call_for(x)[1].kernels.grouped_wgrad == (dtype == torch.float32)
    _, grads = run(experts, x, dy)
    want = reference(experts, x, dy, COUNTS)[1]
    for g, w in zip(grads[1:], want[1:], strict=True):
        assert_rel_close(g, w, REL[dtype], "weight gradient")
    experts(x, torch.tensor(COUNTS)).backward(dy)
    for p, w in zip(params(experts), want[1:], strict=True):
        assert_rel_close(p.grad, 2 * w, REL[dtype], "accumulated weight gradient")
        assert p.grad is not None and not p.grad[1].any()
    got = torch.autograd.grad(experts(x, torch.tensor(COUNTS)), params(experts), dy)  # returned, not adopted
    for g, w in zip(got, want[1:], strict=True):
        assert_rel_close(g, w, REL[dtype], "returned weight gradient")


@pytest.mark.usefixtures("retained")
def test_overlapped_pipeline_with_retained_memory() -> None:
    """Chunks write slices of the gradient (never adopted): still the experts' own gradients."""
    test_overlapped_pipeline_runs_the_same_expert_function(torch.float32, False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_chunked_experts_equal_one_piece(monkeypatch: pytest.MonkeyPatch, kernel: str, dtype: torch.dtype) -> None:
    """Experts in chunks (host memory, glibc's default allocator) give the one-piece result exactly."""
    monkeypatch.setattr("moe_trainer.moe.experts.pads_runs", lambda x: False)  # these runs as they are
    want_y, want = run(*make(kernel, dtype=dtype))
    row_bytes = 2 * H * dtype.itemsize
    chunk_bytes = 7 * row_bytes  # COUNTS [3, 0, 7, 1, 4]: chunks [3, 0], [7], [1, 4]
    assert [(c.first, c.last) for c in expert_kernels.expert_chunks(
        expert_kernels.Runs(torch.tensor(COUNTS)), sum(COUNTS), len(COUNTS), row_bytes, chunk_bytes)] == [
        (0, 2), (2, 3), (3, 5)]
    chosen = expert_kernels.choose_kernels
    monkeypatch.setattr("moe_trainer.moe.experts.choose_kernels",
                        lambda *a: dataclasses.replace(chosen(*a), chunk_bytes=chunk_bytes))
    experts, x, dy = make(kernel, dtype=dtype)
    assert len(experts(x, torch.tensor(COUNTS)).grad_fn.chunks) == 3  # type: ignore[union-attr]
    y, grads = run(experts, x, dy)
    assert torch.equal(y, want_y)
    assert all(torch.equal(g, w) for g, w in zip(grads, want, strict=True))


@pytest.mark.usefixtures("retained")
@pytest.mark.parametrize("kernel", ["grouped", "loop"])
def test_recompute_runs_in_chunks_with_retained_memory(monkeypatch: pytest.MonkeyPatch, kernel: str) -> None:
    """Retained host memory and recompute: the experts run in chunks (the backward's rebuilt activations
    stay bounded), bit for bit the one-piece call that keeps its activations (grouped weight gradients)."""
    experts, x, _ = make(kernel, recompute=True)
    assert experts.call_for(x)[1].kernels.chunk_bytes == expert_kernels.HEAP_CHUNK_BYTES
    assert make(kernel)[0].call_for(x)[1].kernels.chunk_bytes is None
    want_y, want = run(*make(kernel))
    chunk_bytes = 7 * 2 * H * 4  # COUNTS [3, 0, 7, 1, 4]: chunks [3, 0], [7], [1, 4]
    chosen = expert_kernels.choose_kernels
    monkeypatch.setattr("moe_trainer.moe.experts.choose_kernels",
                        lambda *a: dataclasses.replace(chosen(*a), chunk_bytes=chunk_bytes))
    experts, x, dy = make(kernel, recompute=True)
    assert len(experts(x, torch.tensor(COUNTS)).grad_fn.chunks) == 3  # type: ignore[union-attr]
    y, grads = run(experts, x, dy)
    assert torch.equal(y, want_y)
    assert all(torch.equal(g, w) for g, w in zip(grads, want, strict=True))


def test_bf16_rows_with_fp32_weights_match_fp32_and_pad_to_few_shapes() -> None:
    """bf16 rows: computed in bf16 (runs padded to bucketed sizes on CPU), fp32 weight gradients, same function."""
    torch.manual_seed(0)
    counts = [37, 0, 70, 1, 45]
    experts = SwiGLUExperts(len(counts), D, H)
    x = torch.randn(sum(counts), D)
    dy = torch.randn(sum(counts), D)
    got = {}
    for dtype in (torch.float32, torch.bfloat16):
        xi = x.to(dtype, copy=True).requires_grad_()
        y = experts(xi, torch.tensor(counts))
        y.backward(dy.to(dtype))
        assert y.dtype == dtype and xi.grad is not None and xi.grad.dtype == dtype
        got[dtype] = [y.float(), xi.grad.float(), *(p.grad.clone() for p in params(experts))]
        assert all(p.grad.dtype == torch.float32 for p in params(experts))
        experts.zero_grad(set_to_none=True)
    for name, ref, bf in zip(("y", "dx", "dw_gate_up", "dw_down"), got[torch.float32], got[torch.bfloat16],
                             strict=True):
        err = ((bf - ref).norm() / ref.norm()).item()
        assert 1e-5 < err < 2e-2, f"{name}: relative difference {err:.2e}"  # bf16 rounding, nothing more


def test_bucketed_run_lengths_cover_every_run_with_few_sizes() -> None:
    sizes = bucketed(list(range(5000)))
    assert all(n <= m for n, m in zip(range(5000), sizes, strict=True))
    assert all(m - n < max(32, n / 8) for n, m in zip(range(1, 5000), sizes[1:], strict=True))
    assert sizes[0] == 0 and len(set(sizes[2049:4097])) == 8  # 8 sizes per octave


def test_padded_rows_place_each_run_at_its_padded_start() -> None:
    counts = [3, 0, 2]
    padded = bucketed(counts)
    assert padded == [32, 0, 32]
    assert padded_rows(torch.tensor(counts), counts, padded).tolist() == [0, 1, 2, 32, 33]


def test_a_torch_without_the_public_grouped_mm_uses_the_private_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch with only the private op (``F.grouped_mm`` wraps ``torch._grouped_mm``) still runs grouped."""
    a, w = torch.randn(8, D), torch.randn(2, D, H)
    offs = torch.tensor([3, 8], dtype=torch.int32)
    want = expert_kernels.grouped_mm(a, w, offs)
    monkeypatch.delattr(expert_kernels.F, "grouped_mm", raising=False)
    assert torch.equal(expert_kernels.grouped_mm(a, w, offs), want)
    torch.testing.assert_close(want, torch.cat([a[:3] @ w[0], a[3:] @ w[1]]))
    monkeypatch.delattr(torch, "_grouped_mm")  # neither: the probe says no, and the loop serves
    assert not expert_kernels.grouped_mm_serves.__wrapped__(D, H, torch.float32, torch.device("cpu"))
