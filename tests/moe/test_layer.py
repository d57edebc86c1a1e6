"""The MoE layer against a naive per-token loop, and load balancing that actually balances."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.layer import MoELayer
from moe_trainer.moe.router import global_load_balancing_loss


def make_layer(cfg: MoEConfig, d_model: int = 8, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(d_model, cfg).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return layer


def naive_moe(layer: MoELayer, x_TD: torch.Tensor, cfg: MoEConfig, num_groups: int = 1) -> torch.Tensor:
    """Token by token: route, run each chosen expert alone, weight, sum; capacity by explicit counters."""
    experts = layer.experts
    hidden = cfg.expert_hidden
    tokens = x_TD.shape[0]
    per_group = tokens // num_groups
    choices = []  # (priority, token, expert, weight)
    for t in range(tokens):
        logits = x_TD[t].float() @ layer.router.weight.float().t()
        probs = logits.softmax(-1)
        top = probs.topk(cfg.top_k).indices
        w = probs[top] / probs[top].sum() if cfg.normalize_topk else probs[top]
        for k in range(cfg.top_k):
            choices.append((k, t, int(top[k]), w[k]))
    cap = math.ceil(cfg.capacity_factor * per_group * cfg.top_k / cfg.num_experts) if cfg.capacity_factor else None
    used: dict[tuple[int, int], int] = {}
    out = [torch.zeros_like(x_TD[0]) for _ in range(tokens)]
    for _, t, e, w in sorted(choices, key=lambda c: (c[1] // per_group, c[0], c[1])):
        slot = used.get((t // per_group, e), 0)
        used[(t // per_group, e)] = slot + 1
        if cap is not None and slot >= cap:
            continue
        gate, up = (x_TD[t] @ experts.w_gate_up_EDF2[e]).split(hidden)
        out[t] = out[t] + w.to(x_TD.dtype) * ((F.silu(gate) * up) @ experts.w_down_EFD[e])
    return torch.stack(out)


@pytest.mark.parametrize("capacity_factor,groups", [(None, 1), (1.0, 1), (0.5, 2)])
def test_layer_matches_naive_loop_outputs_and_gradients(capacity_factor: float | None, groups: int) -> None:
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=6, capacity_factor=capacity_factor)
    layer = make_layer(cfg)
    x = torch.randn(2, 6, 8, dtype=torch.float64, requires_grad=True)
    y, stats = layer(x, num_groups=groups)
    ref = naive_moe(layer, x.reshape(-1, 8), cfg, groups).view_as(x)
    assert torch.allclose(y, ref, atol=1e-6)
    if capacity_factor:
        assert int(stats.dropped) > 0  # the case really exercises drops
    grad_out = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], grad_out)
    ref_grads = torch.autograd.grad(ref, [x, *layer.parameters()], grad_out)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-5)


def test_shared_experts_see_every_token() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=4, num_shared_experts=2, shared_expert_hidden=3)
    layer = make_layer(cfg)
    x = torch.randn(1, 5, 8, dtype=torch.float64)
    y, _ = layer(x)
    assert layer.shared is not None and layer.shared.hidden == 6
    without = naive_moe(layer, x.reshape(-1, 8), cfg).view_as(x)
    assert torch.allclose(y, without + layer.shared(x), atol=1e-9)


def _train_router(cfg: MoEConfig, steps: int = 150) -> float:
    """Trains a layer on inputs whose mean direction makes expert 0 win; returns final max/mean load."""
    torch.manual_seed(0)
    layer = MoELayer(16, cfg)
    with torch.no_grad():
        layer.router.weight.normal_(std=0.1)
        layer.router.weight[0] += 0.2  # expert 0 wins for inputs with a positive mean
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    target = torch.nn.Linear(16, 16)
    load = torch.zeros(cfg.num_experts)
    for step in range(steps):
        x = torch.randn(256, 16) + 1.0
        y, stats = layer(x[None])
        aux = (stats.aux_loss if cfg.aux_loss_scope == "group"
               else global_load_balancing_loss(stats.mean_probs_E[None], stats.tokens_per_expert_E[None]))
        loss = F.mse_loss(y[0], target(x).detach()) + cfg.aux_loss_coef * aux
        opt.zero_grad()
        loss.backward()
        opt.step()
        layer.router.update_bias(stats.tokens_per_expert_E)
        if step >= steps - 20:  # average the last steps: bias balancing oscillates step to step
            load += stats.tokens_per_expert_E.float()
    return float(load.max() / load.mean())


@pytest.mark.parametrize("scope", ["global", "group"])
def test_aux_loss_reduces_load_imbalance(scope: str) -> None:
    base = dict(num_experts=8, top_k=2, expert_hidden=16, z_loss_coef=0.0, aux_loss_scope=scope)
    unbalanced = _train_router(MoEConfig(**base, aux_loss_coef=0.0))
    balanced = _train_router(MoEConfig(**base, aux_loss_coef=1.0))
    assert unbalanced > 2.0
    assert balanced < 0.6 * unbalanced


def test_bias_balancing_reduces_load_imbalance_without_aux_loss() -> None:
    base = dict(num_experts=8, top_k=2, expert_hidden=16, z_loss_coef=0.0, aux_loss_coef=0.0)
    unbalanced = _train_router(MoEConfig(**base))
    balanced = _train_router(MoEConfig(**base, bias_balancing=True, bias_update_rate=0.02))
    assert balanced < 0.6 * unbalanced


def test_bf16_layer_dispatches_bf16_rows_routes_in_fp32_and_keeps_fp32_gradients(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under bf16 autocast the rows travel and the experts compute in bf16; router, combine and grads are fp32."""
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=32, num_shared_experts=1, shared_expert_hidden=16)
    layer = make_layer(cfg, d_model=16).float()
    x = torch.randn(2, 8, 16)
    ref, _ = layer(x)
    seen: dict[str, torch.dtype] = {}
    dispatcher = layer.dispatcher
    dispatch, run_experts = dispatcher.dispatch, dispatcher.run_experts

    def spy_dispatch(x_TD: torch.Tensor, routing: object, *args: object, **kwargs: object) -> object:
        seen["payload"], seen["probs"] = x_TD.dtype, routing.probs_TE.dtype  # type: ignore[attr-defined]
        seen["weights"] = routing.weight_A.dtype  # type: ignore[attr-defined]
        return dispatch(x_TD, routing, *args, **kwargs)  # type: ignore[arg-type]

    def spy_experts(experts: object, dispatched: object) -> torch.Tensor:
        y = run_experts(experts, dispatched)  # type: ignore[arg-type]
        seen["expert_out"] = y.dtype
        return y

    monkeypatch.setattr(dispatcher, "dispatch", spy_dispatch)
    monkeypatch.setattr(dispatcher, "run_experts", spy_experts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = layer(x)
    assert seen == {"payload": torch.bfloat16, "probs": torch.float32, "weights": torch.float32,
                    "expert_out": torch.bfloat16}
    assert y.dtype == torch.float32 and stats.z_loss.dtype == torch.float32  # the fp32 residual add follows
    assert stats.mean_probs_E.dtype == torch.float32
    err = ((y - ref).norm() / ref.norm()).item()
    assert 1e-5 < err < 2e-2  # really bf16 (8 mantissa bits), and still the same function
    (y.square().sum() + stats.z_loss).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in layer.parameters())
