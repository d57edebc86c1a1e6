"""``train.grad_accum_steps``: the global batch in several forward/backward passes, the large batch's result.

In-process on ``single``, every gradient at step 1 and every logged value of later steps
match the one-pass run wherever the objective does not depend on the pass size: LM and
z losses, capacity per routing group, the per-group aux loss, bias balancing, expert
choice. The global aux loss counts each pass's rows (recorded in the objective, see
``tests/train/test_checkpoint.py``). Layouts with accumulation against ``single`` with
accumulation: ``tests/actors/test_equivalence.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from moe_trainer.config.schema import Config
from moe_trainer.engine import LocalEngine
from tests.helpers import assert_rel_close

REL = 1e-5
STEPS = 3
BASE = ["train.grad_clip=0", "train.batch_size=8", "train.warmup_steps=1"]
MIXES = {
    "capacity_bias_group_aux": ["moe.capacity_factor=1.0", "moe.aux_loss_scope=group", "moe.bias_balancing=true",
                                "moe.bias_update_rate=0.05", "moe.num_shared_experts=1",
                                "moe.shared_expert_hidden=16"],
    "expert_choice": ["moe.router=expert_choice"],
    "global_scope_without_aux": ["moe.aux_loss_coef=0"],  # LM and z loss only
}


def run(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    engine = LocalEngine(cfg)
    records = engine.train(1)
    grads = engine.gradients()[0]
    return records + engine.train(STEPS - 1), grads


@pytest.fixture(scope="module")
def one_pass() -> dict[str, Any]:
    """The one-pass runs, per mix, computed once for the module."""
    return {}


@pytest.mark.parametrize("mix,accum", [("capacity_bias_group_aux", 2), ("capacity_bias_group_aux", 8),
                                       ("expert_choice", 4), ("global_scope_without_aux", 2)])
def test_accumulation_computes_what_the_large_batch_computes(make_config: Callable[..., Config],
                                                             one_pass: dict[str, Any], mix: str, accum: int) -> None:
    if mix not in one_pass:
        one_pass[mix] = run(make_config(*BASE, *MIXES[mix]))
    ref_records, ref_grads = one_pass[mix]
    records, grads = run(make_config(*BASE, *MIXES[mix], f"train.grad_accum_steps={accum}"))
    assert grads.keys() == ref_grads.keys()
    for key, ref in ref_grads.items():
        assert_rel_close(grads[key], ref, REL, key)
    steps = STEPS if mix != "expert_choice" else 1  # tied scores: see tests/actors/test_equivalence.py
    for rec, ref_rec in list(zip(records, ref_records, strict=True))[:steps]:
        # the logged global aux loss is that of the passes, the one optimised (weighted 0 here)
        same = ("loss", "z_loss", "grad_norm", "dropped_frac", "router_entropy")
        for key in same if mix == "global_scope_without_aux" else (*same, "aux_loss", "total_loss"):
            assert rec[key] == pytest.approx(ref_rec[key], rel=REL, abs=1e-12), f"{key} at step {rec['step']}"
        assert rec["tokens_step"] == ref_rec["tokens_step"] and rec["tokens"] == ref_rec["tokens"]
        assert [layer["tokens_per_expert"] for layer in rec["layers"]] == [
            layer["tokens_per_expert"] for layer in ref_rec["layers"]], f"loads at step {rec['step']}"
        assert rec.get("expert_bias") == ref_rec.get("expert_bias"), f"bias at step {rec['step']}"  # sign steps


def test_evaluation_under_accumulation_is_the_same_loss(make_config: Callable[..., Config]) -> None:
    cfg = [*BASE, "moe.capacity_factor=1.0", "moe.aux_loss_scope=group"]
    one, four = LocalEngine(make_config(*cfg)), LocalEngine(make_config(*cfg, "train.grad_accum_steps=4"))
    assert four.evaluate() == pytest.approx(one.evaluate(), rel=1e-6)


def test_the_global_aux_loss_counts_each_pass(make_config: Callable[..., Config]) -> None:
    """With the global scope the objective changes, and only the aux loss: each pass balances its own rows."""
    ref, _ = run(make_config(*BASE))
    got, _ = run(make_config(*BASE, "train.grad_accum_steps=2"))
    assert got[0]["loss"] == pytest.approx(ref[0]["loss"], rel=REL)  # same weights, same rows at step 1
    assert got[0]["z_loss"] == pytest.approx(ref[0]["z_loss"], rel=REL)
    assert got[0]["aux_loss"] != pytest.approx(ref[0]["aux_loss"], rel=REL)  # f_i of each half, not the batch


def test_a_non_finite_second_pass_skips_the_whole_step(make_config: Callable[..., Config]) -> None:
    engine = LocalEngine(make_config(*BASE, "train.grad_accum_steps=2", "train.on_nan=skip"))
    trainer = engine.trainer
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    original, calls = trainer.loss, []

    def second_pass_nan(*args: Any, **kwargs: Any) -> Any:
        parts = original(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            parts.total = parts.total * float("nan")
        return parts

    trainer.loss = second_pass_nan  # type: ignore[method-assign]
    record = engine.train(1)[0]
    assert len(calls) == 2 and record["step_skipped"]
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, before[key]), key  # nothing applied, the bias included
