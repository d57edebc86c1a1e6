"""Permutation, its inverse, gradients and capacity drops."""

from __future__ import annotations

import torch

from moe_trainer.moe.dispatcher import Dispatcher, permute, plan_dispatch, unpermute
from moe_trainer.moe.router import Routing


def make_routing(expert_idx_TK: torch.Tensor, weight_TK: torch.Tensor | None = None) -> Routing:
    tokens, k = expert_idx_TK.shape
    weight_TK = weight_TK if weight_TK is not None else torch.full((tokens, k), 1.0 / k)
    expert_idx_A = expert_idx_TK.t().reshape(-1)
    return Routing(
        token_idx_A=torch.arange(tokens).repeat(k),
        expert_idx_A=expert_idx_A,
        weight_A=weight_TK.t().reshape(-1),
        aux_loss=torch.zeros(()),
        z_loss=torch.zeros(()),
        probs_TE=torch.zeros(tokens, int(expert_idx_TK.max()) + 1),
        tokens_per_expert_E=torch.bincount(expert_idx_A),
        drops_allowed=True,
    )


def test_unpermute_inverts_permute_when_weights_sum_to_one() -> None:
    torch.manual_seed(0)
    x = torch.randn(10, 6)
    expert_idx = torch.stack([torch.randperm(5)[:2] for _ in range(10)])
    weights = torch.rand(10, 2)
    weights = weights / weights.sum(-1, keepdim=True)
    dispatcher = Dispatcher(num_experts=5, capacity_factor=None)
    d = dispatcher.dispatch(x, make_routing(expert_idx, weights), num_groups=1)
    assert torch.allclose(dispatcher.combine(d.x_ND, d), x, atol=1e-6)


def test_rows_are_contiguous_per_expert_in_priority_order() -> None:
    expert_idx = torch.tensor([[1, 0], [0, 1], [1, 2]])
    plan = plan_dispatch(make_routing(expert_idx), num_experts=3, num_groups=1, num_tokens=3, capacity_factor=None)
    # expert 0: token 1 (1st choice) then token 0 (2nd); expert 1: tokens 0, 2 (1st), 1 (2nd); expert 2: token 2
    assert plan.token_idx_N.tolist() == [1, 0, 0, 2, 1, 2]
    assert plan.tokens_per_expert_E.tolist() == [2, 3, 1]
    assert int(plan.dropped) == 0


def test_permute_unpermute_gradcheck_float64() -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(12, dtype=torch.float64, requires_grad=True)
    token_idx = torch.tensor([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0])
    scale = torch.randn(12, 3, dtype=torch.float64)

    def f(x_: torch.Tensor, w_: torch.Tensor) -> torch.Tensor:
        return unpermute(permute(x_, token_idx) * scale, token_idx, w_, 6)

    assert torch.autograd.gradcheck(f, (x, w))


def test_capacity_drops_exactly_the_tokens_past_capacity() -> None:
    # 6 tokens, all top-1 to expert 0 of 2; cf=1 -> capacity ceil(6 * 1 / 2) = 3
    expert_idx = torch.zeros(6, 1, dtype=torch.long)
    plan = plan_dispatch(make_routing(expert_idx), num_experts=2, num_groups=1, num_tokens=6, capacity_factor=1.0)
    assert plan.token_idx_N.tolist() == [0, 1, 2]
    assert int(plan.dropped) == 3
    # two routing groups of 3 tokens: capacity ceil(3 / 2) = 2 per group
    plan = plan_dispatch(make_routing(expert_idx), num_experts=2, num_groups=2, num_tokens=6, capacity_factor=1.0)
    assert plan.token_idx_N.tolist() == [0, 1, 3, 4]
    assert int(plan.dropped) == 2


def test_first_choices_outrank_second_choices_at_capacity() -> None:
    # expert 0 is token 0's second choice and tokens 1, 2's first choice; capacity = ceil(1*3*2/3) = 2
    expert_idx = torch.tensor([[1, 0], [0, 2], [0, 1]])
    plan = plan_dispatch(make_routing(expert_idx), num_experts=3, num_groups=1, num_tokens=3, capacity_factor=1.0)
    expert0_tokens = plan.token_idx_N[: plan.tokens_per_expert_E[0]].tolist()
    assert expert0_tokens == [1, 2]
    assert int(plan.dropped) == 1


def test_dropped_tokens_get_zero_expert_output() -> None:
    x = torch.randn(4, 2)
    expert_idx = torch.zeros(4, 1, dtype=torch.long)
    dispatcher = Dispatcher(num_experts=4, capacity_factor=1.0)  # capacity 1
    d = dispatcher.dispatch(x, make_routing(expert_idx, torch.ones(4, 1)), num_groups=1)
    y = dispatcher.combine(d.x_ND, d)
    assert torch.equal(y[0], x[0]) and torch.count_nonzero(y[1:]) == 0
