"""``train.expert_lr_scale``: the routed experts' parameter groups get ``train.lr`` times the scale at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch import nn

from moe_trainer.config.schema import MoEConfig, TrainConfig
from moe_trainer.train.optim import bias_rate_factor, build_optimizer, lr_factor, set_lr


def _model() -> nn.Module:
    block = nn.Module()
    block.experts = nn.Linear(4, 4)  # named like SwiGLUExperts' parameters: "block.experts.weight"
    block.attn = nn.Linear(4, 4)
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
    assert decayed == {id(model.block.experts.weight), id(model.block.attn.weight)}  # matrices only, as before


def test_scale_one_keeps_the_two_groups() -> None:
    optimizer = build_optimizer(_model(), TrainConfig())
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 2]


def test_bias_rate_follows_the_lr_decay_but_not_its_warmup() -> None:
    train = TrainConfig(lr=3e-3, warmup_steps=10, max_steps=100, min_lr_ratio=0.1)
    constant, by_lr = MoEConfig(), MoEConfig(bias_update_schedule="lr")
    assert [bias_rate_factor(s, constant, train) for s in (0, 10, 99)] == [1.0, 1.0, 1.0]
    assert [bias_rate_factor(s, by_lr, train) for s in (0, 9)] == [1.0, 1.0]  # full rate while the lr warms up
    assert [bias_rate_factor(s, by_lr, train) for s in (10, 55, 99)] == [lr_factor(s, train) for s in (10, 55, 99)]
    assert bias_rate_factor(10, by_lr, train) == 1.0
    assert bias_rate_factor(99, by_lr, train) == pytest.approx(0.1, rel=1e-2)
