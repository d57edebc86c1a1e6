"""``train.expert_lr_scale``, ``train.router_lr_scale``: those groups get ``train.lr`` times the scale at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from moe_trainer.config.schema import MoEConfig, TrainConfig
from moe_trainer.train.optim import bias_rate_factor, build_optimizer, lr_factor, set_lr


def _model() -> nn.Module:
    block = nn.Module()
    block.experts = nn.Linear(4, 4)  # named like SwiGLUExperts' parameters: "block.experts.weight"
    block.attn = nn.Linear(4, 4)
    block.router = nn.Module()
    block.router.weight = nn.Parameter(torch.zeros(3, 4))  # named like Router's: "block.router.weight"
    model = nn.Module()
    model.block = block
    return model


@pytest.mark.parametrize("step", [0, 10, 299])
def test_expert_groups_follow_the_schedule_times_the_scale(step: int) -> None:
    model = _model()
    cfg = replace(TrainConfig(), expert_lr_scale=3.0)
    optimizer = build_optimizer(model, cfg)
    base = set_lr(optimizer, step, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    for name, param in model.named_parameters():
        assert lr_of[id(param)] == pytest.approx(base * (3.0 if ".experts." in name else 1.0)), name
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {id(model.block.experts.weight), id(model.block.attn.weight), id(model.block.router.weight)}


@pytest.mark.parametrize(("expert_scale", "router_scale"), [(1.0, 0.1), (0.5, 0.1), (0.1, 0.1)])
def test_router_group_follows_the_schedule_times_its_scale(expert_scale: float, router_scale: float) -> None:
    model = _model()
    cfg = replace(TrainConfig(), expert_lr_scale=expert_scale, router_lr_scale=router_scale)
    optimizer = build_optimizer(model, cfg)
    base = set_lr(optimizer, 200, cfg)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(model.block.router.weight)] == pytest.approx(base * router_scale)
    assert lr_of[id(model.block.experts.weight)] == pytest.approx(base * expert_scale)
    assert lr_of[id(model.block.attn.weight)] == pytest.approx(base)
    assert lr_of[id(model.block.attn.bias)] == pytest.approx(base)


def test_scale_one_keeps_the_two_groups() -> None:
    optimizer = build_optimizer(_model(), TrainConfig())
    assert [len(g["params"]) for g in optimizer.param_groups] == [3, 2]


def test_groups_follow_the_config_not_the_parameters_a_rank_owns() -> None:
    """A rank of a sharded optimizer that owns no router still has the router's (empty) groups."""
    cfg = replace(TrainConfig(), expert_lr_scale=2.0, router_lr_scale=0.1)
    everything = build_optimizer(_model(), cfg)
    no_router = build_optimizer(_model(), cfg, owns=lambda name: "router" not in name)
    assert [g["lr_scale"] for g in no_router.param_groups] == [g["lr_scale"] for g in everything.param_groups]
    assert [len(g["params"]) for g in no_router.param_groups] == [1, 1, 1, 1, 0, 0]


def test_bias_rate_follows_the_lr_decay_but_not_its_warmup() -> None:
    train = TrainConfig(lr=3e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    constant, by_lr = MoEConfig(), MoEConfig(bias_update_schedule="lr")
    assert [bias_rate_factor(s, constant, train) for s in (0, 10, 99)] == [1.0, 1.0, 1.0]
    assert [bias_rate_factor(s, by_lr, train) for s in (0, 9)] == [1.0, 1.0]  # full rate while the lr warms up
    assert [bias_rate_factor(s, by_lr, train) for s in (10, 55, 99)] == [lr_factor(s, train) for s in (10, 55, 99)]
    assert bias_rate_factor(10, by_lr, train) == 1.0
    assert bias_rate_factor(99, by_lr, train) == pytest.approx(0.1, rel=1e-2)
