"""Router math against hand-computed values."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.router import (
    Router,
    capacity,
    global_load_balancing_loss,
    is_router_param,
    load_balancing_loss,
    router_z_loss,
)


def identity_router(cfg: MoEConfig) -> Router:
    """A router whose logits equal its input (weight = I), so tests choose logits directly."""
    router = Router(cfg.num_experts, cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.num_experts))
    return router


LOGITS = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.5, 3.0, 0.0]])


def softmax_row(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [v / sum(exps) for v in exps]


def test_softmax_then_topk_weights_and_experts() -> None:
    r = identity_router(MoEConfig(num_experts=4, top_k=2, normalize_topk=False))(LOGITS)
    p0, p1 = softmax_row(LOGITS[0].tolist()), softmax_row(LOGITS[1].tolist())
    # k-major order: first choices of tokens 0,1 then second choices of tokens 0,1
    assert r.token_idx_A.tolist() == [0, 1, 0, 1]
    assert r.expert_idx_A.tolist() == [0, 2, 1, 1]
    assert r.weight_A.tolist() == pytest.approx([p0[0], p1[2], p0[1], p1[1]], rel=1e-6)


def test_renormalised_and_mixtral_orders_agree_and_sum_to_one() -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, normalize_topk=True)
    renorm = identity_router(cfg)(LOGITS)
    mixtral = identity_router(MoEConfig(num_experts=4, top_k=2, score_order="topk_softmax"))(LOGITS)
    p0 = softmax_row(LOGITS[0].tolist())
    assert renorm.weight_A[0].item() == pytest.approx(p0[0] / (p0[0] + p0[1]), rel=1e-6)
    assert torch.allclose(renorm.weight_A, mixtral.weight_A, atol=1e-6)
    per_token = torch.zeros(2).index_add(0, renorm.token_idx_A, renorm.weight_A)
    assert torch.allclose(per_token, torch.ones(2))


@pytest.mark.parametrize("router", ["topk", "switch", "expert_choice"])
def test_routed_scale_multiplies_every_gate_weight_and_changes_no_choice(router: str) -> None:
    base = MoEConfig(num_experts=4, top_k=2, router=router)
    plain, scaled = identity_router(base)(LOGITS), identity_router(replace(base, routed_scale=2.5))(LOGITS)
    assert torch.equal(plain.expert_idx_A, scaled.expert_idx_A) and torch.equal(plain.token_idx_A, scaled.token_idx_A)
    assert torch.allclose(scaled.weight_A, 2.5 * plain.weight_A)


def test_switch_is_top1_with_probability_weight() -> None:
    r = identity_router(MoEConfig(num_experts=4, top_k=2, router="switch"))(LOGITS)
    assert r.expert_idx_A.tolist() == [0, 2]
    assert r.weight_A[1].item() == pytest.approx(softmax_row(LOGITS[1].tolist())[2], rel=1e-6)


def test_load_balancing_loss_hand_computed() -> None:
    # 2 tokens, 2 experts, top-1: both tokens to expert 0 -> f = [1, 0]
    probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]]])
    idx = torch.tensor([[[0], [0]]])
    # E * sum f_i P_i = 2 * (1 * 0.625 + 0 * 0.375)
    assert load_balancing_loss(probs, idx, 2).item() == pytest.approx(1.25)
    uniform = torch.full((1, 4, 2), 0.5)
    balanced = torch.tensor([[[0], [1], [0], [1]]])
    assert load_balancing_loss(uniform, balanced, 2).item() == pytest.approx(1.0)


def test_load_balancing_loss_is_a_mean_over_groups() -> None:
    probs = torch.tensor([[[0.75, 0.25], [0.5, 0.5]], [[0.5, 0.5], [0.5, 0.5]]])
    idx = torch.tensor([[[0], [0]], [[0], [1]]])
    assert load_balancing_loss(probs, idx, 2).item() == pytest.approx((1.25 + 1.0) / 2)


def test_global_loss_is_the_one_group_loss_of_the_global_batch_in_value_and_gradient() -> None:
    """Two ranks, each adding E sum f_i(global) P_i(own rows), averaged as gradients are: single's loss."""
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)  # [ranks, tokens, experts]
    idx = logits.detach().topk(2, dim=-1).indices  # top-2
    counts = torch.bincount(idx.flatten(), minlength=4)[None]  # summed over both ranks
    single = load_balancing_loss(logits.softmax(-1).reshape(1, 12, 4), idx.reshape(1, 12, 2), 4)
    (single_grad,) = torch.autograd.grad(single, logits)
    per_rank = [global_load_balancing_loss(logits[r].softmax(-1).mean(0)[None], counts) for r in range(2)]
    averaged = torch.stack(per_rank).mean()
    (grad,) = torch.autograd.grad(averaged, logits)
    assert averaged.item() == pytest.approx(single.item(), rel=1e-12)
    torch.testing.assert_close(grad, single_grad, rtol=1e-12, atol=1e-15)
    # local counts instead of the global ones give another value: the test would see that bug
    local = torch.bincount(idx[0].flatten(), minlength=4)[None]
    assert global_load_balancing_loss(logits[0].softmax(-1).mean(0)[None], local).item() != pytest.approx(
        per_rank[0].item(), rel=1e-3)


def test_z_loss_hand_computed() -> None:
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS.tolist()) / 2
    assert router_z_loss(LOGITS).item() == pytest.approx(expected, rel=1e-6)
    r = identity_router(MoEConfig(num_experts=4, top_k=2))(LOGITS)
    assert r.z_loss.item() == pytest.approx(expected, rel=1e-6)


def test_router_math_is_fp32_for_low_precision_inputs() -> None:
    r = identity_router(MoEConfig(num_experts=4, top_k=2))(LOGITS.bfloat16())
    assert r.weight_A.dtype == torch.float32 and r.probs_TE.dtype == torch.float32


def test_expert_choice_gives_each_expert_exactly_its_capacity() -> None:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0)
    router = Router(8, cfg)
    torch.nn.init.normal_(router.weight)
    r = router(torch.randn(32, 8), num_groups=2)
    cap = capacity(16, 2, 4, 1.0)
    assert cap == 8
    assert r.tokens_per_expert_E.tolist() == [2 * cap] * 4  # cap per expert per group, 2 groups
    groups = r.token_idx_A // 16
    for g in range(2):
        counts = torch.bincount(r.expert_idx_A[groups == g], minlength=4)
        assert counts.tolist() == [cap] * 4
    assert not r.drops_allowed and r.aux_loss.item() == 0.0


def test_expert_choice_breaks_exact_ties_by_position() -> None:
    """Tokens with equal scores (identical states) go to an expert in sequence order, in any layout."""
    cfg = MoEConfig(num_experts=2, top_k=1, router="expert_choice", capacity_factor=1.0)
    router = identity_router(cfg)
    x = torch.tensor([[0.0, 1.0]] + [[1.0, 0.0]] * 7)  # 7 identical tokens; capacity 4 per expert
    r = router(x)
    picked_by_0 = sorted(r.token_idx_A[r.expert_idx_A == 0].tolist())
    assert picked_by_0 == [1, 2, 3, 4]  # the first four of the tied tokens, not whichever topk returns


def test_bias_balancing_changes_selection_not_weights_and_updates_by_sign() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, router="topk", bias_balancing=True, bias_update_rate=0.5)
    router = identity_router(cfg)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))
    r = router(LOGITS)
    assert r.expert_idx_A.tolist() == [3, 3]
    assert r.weight_A[0].item() == pytest.approx(softmax_row(LOGITS[0].tolist())[3] / softmax_row(
        LOGITS[0].tolist())[3], rel=1e-6)  # renormalised top-1 weight is 1 whatever the bias
    router.update_bias(torch.tensor([0, 0, 0, 8]))
    assert router.expert_bias.tolist() == [0.5, 0.5, 0.5, 9.5]
    router.update_bias(torch.tensor([0, 0, 0, 8]), rate_factor=0.25)  # moe.bias_update_schedule's factor
    assert router.expert_bias.tolist() == [0.625, 0.625, 0.625, 9.375]


def test_proportional_bias_update_moves_each_expert_by_its_relative_deviation() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, router="topk", bias_balancing=True, bias_update_rate=0.1,
                    bias_update="proportional")
    router = identity_router(cfg)
    router.update_bias(torch.tensor([2, 4, 4, 6]))  # mean 4: -50%, 0, 0, +50%
    assert router.expert_bias.tolist() == pytest.approx([0.05, 0.0, 0.0, -0.05])
    router.update_bias(torch.tensor([2, 4, 4, 6]), rate_factor=0.5)
    assert router.expert_bias.tolist() == pytest.approx([0.075, 0.0, 0.0, -0.075])
    router.update_bias(torch.zeros(4, dtype=torch.int64))  # nothing routed (no tokens): no step, no nan
    assert router.expert_bias.tolist() == pytest.approx([0.075, 0.0, 0.0, -0.075])


def test_the_router_parameters_are_exactly_each_moe_layers_router_weight() -> None:
    """``train.router_lr_scale`` finds the routers by name: every MoE layer's, and nothing else."""
    from moe_trainer.config.schema import ModelConfig
    from moe_trainer.model.transformer import Transformer

    model = Transformer(ModelConfig(), replace(MoEConfig(), first_dense=1), 257, 0)
    named = [name for name, _ in model.named_parameters() if is_router_param(name)]
    assert named == [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, Router)]
    assert len(named) == ModelConfig().n_layers - 1
