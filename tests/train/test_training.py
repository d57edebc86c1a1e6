"""End-to-end single-process training through the same entry point ``moe-train`` uses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from moe_trainer.cli import make_engine
from moe_trainer.config.schema import to_dataclass
from moe_trainer.engine import EngineLost, LocalEngine
from moe_trainer.logging import read_offline_run
from moe_trainer.outputs import RunOutputs
from moe_trainer.restarts import train_with_restarts
from moe_trainer.train.resume import plan_resume
from tests.conftest import compose_dict
from tests.helpers import read_records, train_run


def run(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = train_run(run_dir, *overrides)
    return result.summary, result.records


def train_losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_training_reduces_validation_loss(tmp_path: Path) -> None:
    summary, records = run(tmp_path, "train.max_steps=40", "train.eval_every=40", "train.lr=1e-2")
    assert summary["final_val_loss"] < 0.75 * summary["initial_val_loss"]
    assert records[0] == {"step": 0, "val_loss": summary["initial_val_loss"]}
    keys = {"step", "loss", "aux_loss", "z_loss", "tokens_per_s", "load_imbalance", "dropped_frac", "layers"}
    assert keys <= set(records[1])
    assert len(records[1]["layers"][0]["tokens_per_expert"]) == 4


def test_same_seed_gives_identical_losses_and_other_seed_does_not(tmp_path: Path) -> None:
    _, a = run(tmp_path / "a")
    _, b = run(tmp_path / "b")
    _, c = run(tmp_path / "c", "train.seed=1")
    assert train_losses(a) == train_losses(b)
    assert train_losses(a) != train_losses(c)


@pytest.mark.parametrize("extra", [[], ["moe.capacity_factor=1.0", "moe.bias_balancing=true"]])
def test_resume_continues_the_same_loss_curve(tmp_path: Path, extra: list[str]) -> None:
    _, full = run(tmp_path / "full", *extra)
    ckpt = tmp_path / "full" / "checkpoints" / "step_00000003"
    assert ckpt.is_dir()
    summary, resumed = run(tmp_path / "resumed", *extra, f"train.resume={ckpt}")
    assert summary["start_step"] == 3
    full_tail = {s: v for s, v in train_losses(full).items() if s > 3}
    assert train_losses(resumed) == full_tail


def test_resume_auto_uses_latest_checkpoint_in_run_dir(tmp_path: Path) -> None:
    run(tmp_path, "train.max_steps=3")
    summary, _ = run(tmp_path, "train.max_steps=6", "train.resume=auto")
    assert summary["start_step"] == 3 and summary["resumed_from_step"] == 3


class LosesItsProcessAtStep4(LocalEngine):
    """A LocalEngine that fails at step 4 the way a Ray engine does when an actor dies."""

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        if self.step == 4:
            raise EngineLost("injected: actor rank 1 died")
        return super().train(num_steps)


def test_restart_reports_the_first_attempts_initial_val_loss(tmp_path: Path) -> None:
    dcfg = compose_dict(["experiment=debug", "fault_tolerance.max_restarts=1"])
    cfg = to_dataclass(dcfg)
    outputs = RunOutputs(tmp_path, {}, cfg.logger, "single")
    summary, engine = train_with_restarts(cfg, LosesItsProcessAtStep4(cfg), outputs, make_engine)  # rebuilt: local
    outputs.close()
    records = read_records(tmp_path)
    assert summary["restarts"] == 1 and summary["start_step"] == 3 and engine.step == 6
    assert summary["initial_val_loss"] == records[0]["val_loss"]
    assert records[0]["step"] == 0


def test_a_restart_before_a_resumed_runs_first_checkpoint_goes_back_to_the_resume_point(tmp_path: Path) -> None:
    run(tmp_path / "a", "train.max_steps=3")
    overrides = ["fault_tolerance.max_restarts=1", "train.checkpoint_every=0", f"train.resume={tmp_path / 'a'}"]
    cfg = to_dataclass(compose_dict(["experiment=debug", *overrides]))
    resume = plan_resume(cfg.train.resume, cfg.train.max_steps, tmp_path / "b")
    assert resume is not None
    engine = LosesItsProcessAtStep4(cfg)
    engine.load(resume.checkpoint)
    outputs = RunOutputs(tmp_path / "b", {}, cfg.logger, "single")
    summary, engine = train_with_restarts(cfg, engine, outputs, make_engine, resume)  # no checkpoint in b before step 6
    outputs.close()
    (restart,) = [r for r in read_records(tmp_path / "b") if "restart" in r]
    assert restart["resumed_from"] == str(resume.checkpoint) and restart["step"] == 3
    assert summary["start_step"] == 3 and engine.step == 6


def test_dense_baseline_trains_with_equal_active_parameters(tmp_path: Path) -> None:
    moe, _ = run(tmp_path / "moe", "train.max_steps=2")
    dense, records = run(tmp_path / "dense", "model=dense", "train.max_steps=2")
    assert dense["params_total"] == dense["params_active"]
    # 2 MoE layers: the router's 4 x d_model weights, which the dense FFN matches with round(4 / 3) more
    # hidden units of 3 x d_model each
    assert moe["params_active"] - dense["params_active"] == 2 * (4 * 32 - round(4 / 3) * 3 * 32)
    assert moe["params_total"] > dense["params_total"]
    assert [r for r in records if "loss" in r][-1]["layers"] == []


def test_wandb_offline_run_is_written_and_reads_back(tmp_path: Path) -> None:
    summary, records = run(tmp_path, "logger.mode=offline", "logger.group=exp1", "logger.tags=[t1]")
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_offline_run(runs[0])
    train_rows = {row["train/step"]: row for row in logged.history if "train/loss" in row}
    assert sorted(train_rows) == [r["step"] for r in records if "loss" in r]
    for record in records:
        if "loss" in record:
            assert train_rows[record["step"]]["train/loss"] == pytest.approx(record["loss"])
            assert train_rows[record["step"]]["balance/load_imbalance"] == pytest.approx(record["load_imbalance"])
    assert logged.summary["final_val_loss"] == pytest.approx(summary["final_val_loss"])
    assert logged.config["moe"]["num_experts"] == 4


def test_the_trainer_steps_the_bias_at_its_scheduled_rate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``moe.bias_update_schedule=lr``: the rate factor the trainer hands each router, step by step."""
    from moe_trainer.moe.router import Router
    from moe_trainer.train.optim import lr_factor

    factors: list[float] = []
    update = Router.update_bias

    def record(router: Router, load_E: Any, rate_factor: float = 1.0) -> None:
        factors.append(rate_factor)
        update(router, load_E, rate_factor)

    monkeypatch.setattr(Router, "update_bias", record)
    overrides = ["moe.bias_balancing=true", "moe.bias_update_schedule=lr", "train.max_steps=5", "train.warmup_steps=2",
                 "train.eval_every=5", "train.checkpoint_every=0"]
    train_run(tmp_path, *overrides)
    train = to_dataclass(compose_dict(["experiment=debug", *overrides])).train
    want = [1.0, 1.0, *(lr_factor(step, train) for step in (2, 3, 4))]  # the warmup's steps at the full rate
    assert factors == [f for f in want for _ in range(2)]  # the debug model's two MoE layers
    assert want[4] < want[3] < want[2] == 1.0
