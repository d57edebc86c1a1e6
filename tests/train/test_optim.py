"""``train.expert_lr_scale``: the routed experts' parameter groups get ``train.lr`` times the scale at every step."""

from __future__ import annotations

from dataclasses import replace

import pytest
from torch import nn

from moe_trainer.config.schema import TrainConfig
from moe_trainer.train.optim import build_optimizer, set_lr


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
