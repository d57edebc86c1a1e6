"""The skip policy against hand-written step sequences, and the finiteness check of a real trainer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_trainer.config.schema import Config
from moe_trainer.engine import LocalEngine
from moe_trainer.train.nan_guard import SkipPolicy, nonfinite_tensors, run_steps


def steps(flags: list[bool]) -> Callable[[], dict]:
    """A step function whose i-th call returns a record with ``step_skipped=flags[i]``."""
    it = iter(enumerate(flags, start=1))

    def step() -> dict:
        i, skipped = next(it)
        return {"step": i, "step_skipped": skipped}

    return step


def test_stop_ends_the_chunk_right_after_the_first_skipped_step() -> None:
    records = run_steps(steps([False, True, False, False]), 4, SkipPolicy("stop", 10))
    assert [r["step"] for r in records] == [1, 2]


def test_skip_counts_only_skips_in_a_row_and_across_chunks() -> None:
    policy = SkipPolicy("skip", 2)
    step = steps([True, False, True, True, False])
    assert [r["step"] for r in run_steps(step, 3, policy)] == [1, 2, 3]  # a finite step resets the count
    assert [r["step"] for r in run_steps(step, 2, policy)] == [4]  # the 2nd in a row, counted across chunks
    assert policy.consecutive == 2


def test_nonfinite_tensors_names_parameters_and_optimizer_moments(make_config: Callable[..., Config]) -> None:
    engine = LocalEngine(make_config())
    engine.train(1)
    trainer = engine.trainer
    assert nonfinite_tensors(trainer.model, trainer.optimizer) == []
    with torch.no_grad():
        trainer.model.embed.weight[1, 2] = float("inf")
    w_down = trainer.model.blocks[0].ffn.experts.w_down_EFD
    trainer.optimizer.state[w_down]["exp_avg_sq"][0, 0, 0] = float("nan")
    assert nonfinite_tensors(trainer.model, trainer.optimizer) == [
        "model/embed.weight", "optim.exp_avg_sq/blocks.0.ffn.experts.w_down_EFD"]
