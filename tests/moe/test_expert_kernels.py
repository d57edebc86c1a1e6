"""The hand-written grouped SwiGLU backward against autograd on the same math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_trainer.moe.experts import SwiGLUExperts, bucketed, padded_rows

COUNTS = [3, 0, 7, 1, 4]  # an expert with no rows on purpose
D, H = 16, 24


def reference(experts: SwiGLUExperts, x: Tensor) -> Tensor:
    outs = []
    for x_n, w_gu, w_down in zip(x.split(COUNTS), experts.w_gate_up_EDF2.unbind(0), experts.w_down_EFD.unbind(0),
                                 strict=True):
        gate, up = (x_n @ w_gu).split(H, dim=-1)
        outs.append((F.silu(gate) * up) @ w_down)
    return torch.cat(outs)


@pytest.fixture
def setup() -> tuple[SwiGLUExperts, Tensor, Tensor]:
    torch.manual_seed(0)
    experts = SwiGLUExperts(len(COUNTS), D, H).double()
    return experts, torch.randn(sum(COUNTS), D, dtype=torch.float64, requires_grad=True), \
        torch.randn(sum(COUNTS), D, dtype=torch.float64)


def params(experts: SwiGLUExperts) -> list[Tensor]:
    return [experts.w_gate_up_EDF2, experts.w_down_EFD]


def test_backward_matches_autograd_and_accumulates(setup: tuple[SwiGLUExperts, Tensor, Tensor]) -> None:
    experts, x, dy = setup
    counts = torch.tensor(COUNTS)
    want = torch.autograd.grad(reference(experts, x), [x, *params(experts)], dy)

    y = experts(x, counts)
    torch.testing.assert_close(y, reference(experts, x), rtol=1e-12, atol=1e-12)
    y.backward(dy)
    got = [x.grad, *(p.grad for p in params(experts))]
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert experts.w_down_EFD.grad is not None and not experts.w_down_EFD.grad[1].any()  # no rows: zero grad

    experts(x, counts).backward(dy)  # a second backward adds, as autograd does
    for p, w in zip(params(experts), want[1:], strict=True):
        torch.testing.assert_close(p.grad, 2 * w, rtol=1e-12, atol=1e-12)


def test_weight_gradient_buffer_is_reused_across_steps(setup: tuple[SwiGLUExperts, Tensor, Tensor]) -> None:
    experts, x, dy = setup
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


def test_autograd_grad_returns_weight_gradients(setup: tuple[SwiGLUExperts, Tensor, Tensor]) -> None:
    experts, x, dy = setup
    want = torch.autograd.grad(reference(experts, x), params(experts), dy)
    got = torch.autograd.grad(experts(x, torch.tensor(COUNTS)), params(experts), dy)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    assert all(p.grad is None for p in params(experts))  # autograd.grad never touches .grad


def test_backward_inputs_leaves_weights_alone(setup: tuple[SwiGLUExperts, Tensor, Tensor]) -> None:
    experts, x, dy = setup
    experts(x, torch.tensor(COUNTS)).backward(dy, inputs=[x])
    assert x.grad is not None and all(p.grad is None for p in params(experts))


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
