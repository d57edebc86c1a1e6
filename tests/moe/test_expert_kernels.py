"""The hand-written grouped SwiGLU backward against autograd on the same math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from moe_trainer.moe.experts import SwiGLUExperts

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
