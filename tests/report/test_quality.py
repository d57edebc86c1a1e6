"""The MoE-vs-dense view: steps to reach dense's final loss (interpolated), FLOPs per token, balance per layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_trainer.report.load import Run
from moe_trainer.report.quality import flops_per_token, quality_markdown, quality_rows, reach_step, write_quality_plots


def _run(label: str, arch: str, evals: list[tuple[int, float]], active: int, total: int,
         max_mean: float = 1.0) -> Run:
    config = {"model": {"arch": arch, "n_layers": 2, "d_model": 32}, "train": {"batch_size": 4},
              "data": {"seq_len": 16}}
    train = [{"step": s, "loss": v, "layers": [{"max_mean": max_mean, "tokens_per_expert": [s % 200 + 1, 100]},
                                               {"max_mean": 2 * max_mean}]}
             for s, v in evals]
    return Run(Path(label), config, {"params_active": active, "params_total": total}, train,
               [{"step": s, "val_loss": v} for s, v in evals], label=label, slug=label)


def test_steps_to_reach_are_interpolated_between_evaluations() -> None:
    evals = [{"step": 0, "val_loss": 5.0}, {"step": 100, "val_loss": 2.0}, {"step": 200, "val_loss": 1.0}]
    assert reach_step(evals, 1.5) == pytest.approx(150.0)
    assert reach_step(evals, 2.0) == 100.0
    assert reach_step(evals, 6.0) == 0.0
    assert reach_step(evals, 0.5) is None


def test_rows_compare_every_moe_run_with_the_dense_one_and_the_figures_are_drawn(tmp_path: Path) -> None:
    dense = _run("dense", "dense", [(0, 5.0), (100, 2.0), (200, 1.5)], 1000, 1000)
    moe = _run("moe", "moe", [(0, 5.0), (100, 1.5), (200, 1.2)], 1000, 3000, max_mean=1.2)
    slow = _run("slow", "moe", [(0, 5.0), (100, 2.5), (200, 1.8)], 1000, 3000)
    rows = quality_rows([moe, dense, slow])
    assert [r.label for r in rows] == ["dense", "moe", "slow"]  # the baseline first
    assert rows[1].reach_step == 100.0 and rows[1].reach_fraction == pytest.approx(0.5)
    assert rows[2].reach_step is None
    assert rows[1].balance == [pytest.approx(1.2), pytest.approx(2.4)]  # per layer, second half
    # pooled over the second half (steps 100 and 200): expert 0 got 101 + 1, expert 1 100 + 100
    assert rows[1].pooled[0] == pytest.approx(200 / 151) and rows[1].pooled[1] != rows[1].pooled[1]  # nan: no loads
    table = quality_markdown(rows)
    assert "| moe | 0.00M | 0.00M | 1.2000 | 100 | 50% | 1.200, 2.400 | 1.325, nan |" in table and "| slow |" in table
    assert flops_per_token(moe) == 6 * 1000 + 12 * 2 * 16 * 32
    files = [name for name, _ in write_quality_plots([dense, moe, slow], tmp_path)]
    assert files == ["val_loss_vs_steps.png", "val_loss_vs_tokens.png", "val_loss_vs_flops.png"]
    assert all((tmp_path / f).stat().st_size > 10_000 for f in files)
    assert quality_rows([moe, slow]) == [] and write_quality_plots([moe], tmp_path) == []  # no dense run: no view


def test_the_longest_dense_run_is_the_baseline_and_shorter_runs_are_rows() -> None:
    """A 600-step run has its own schedule: it is measured against the 1000-step dense run's final loss."""
    short_dense = _run("dense600", "dense", [(0, 5.0), (300, 2.0), (600, 1.6)], 1000, 1000)
    dense = _run("dense", "dense", [(0, 5.0), (500, 2.0), (1000, 1.5)], 1000, 1000)
    short_moe = _run("moe600", "moe", [(0, 5.0), (300, 1.9), (600, 1.4)], 1000, 3000)
    rows = quality_rows([short_dense, short_moe, dense])
    assert [(r.label, r.dense) for r in rows] == [("dense", True), ("dense600", False), ("moe600", False)]
    assert rows[1].reach_step is None  # 1.6 never reaches 1.5
    assert rows[2].reach_step == pytest.approx(540.0) and rows[2].reach_fraction == pytest.approx(0.54)
