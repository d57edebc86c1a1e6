"""Resuming: where a run continues from, what it reports, the W&B run it continues, and when it has nothing to do.

The ``moe-train`` path (the launch gate before Hydra writes, a finished run directory left
byte for byte as it was) is in ``tests/test_cli.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.logging import find_offline_runs, read_offline_run
from moe_trainer.logging.wandb_logger import wandb_run_id
from moe_trainer.train.resume import NothingToDo, require_fixed_run_dir
from tests.helpers import train_run, tree_state

OFFLINE = "logger.mode=offline"


def val_loss_at(records: list[dict], step: int) -> float:
    (value,) = [r["val_loss"] for r in records if r["step"] == step and "val_loss" in r]
    return value


def test_resume_says_where_it_continues_evaluates_there_and_continues_the_wandb_run(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = train_run(tmp_path, "train.max_steps=3", OFFLINE)  # evaluates and saves at step 3
    capsys.readouterr()
    resumed = train_run(tmp_path, "train.max_steps=6", "train.resume=auto", OFFLINE)
    ckpt = tmp_path / "checkpoints" / "step_00000003"
    assert f"resumed from step 3 of {tmp_path} (step_00000003)" in capsys.readouterr().out

    # metrics.jsonl: the resume event, then a real evaluation of the checkpoint's weights
    new = resumed.records[len(first.records):]
    assert new[0] == {"step": 3, "event": "resumed", "resumed_from_step": 3, "resumed_from": str(ckpt)}
    assert new[1] == {"step": 3, "val_loss": val_loss_at(first.records, 3)}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {k: v for k, v in resumed.summary.items() if k != "wandb_sync"}
    assert summary["initial_val_loss"] == val_loss_at(first.records, 3)
    assert summary["resumed_from_step"] == 3 and summary["resumed_from"] == str(ckpt)

    # W&B: the second start logs into the same run (id), from step 3 on, with the event and summary fields
    starts = [read_offline_run(r) for r in find_offline_runs(tmp_path / "wandb")]
    assert len(starts) == 2
    assert starts[0].run_id == starts[1].run_id == wandb_run_id(tmp_path)
    assert starts[1].series("events/resumed_from_step") == [(3, 3)]
    assert starts[1].series("eval/val_loss")[0] == (3, val_loss_at(first.records, 3))
    assert [step for step, _ in starts[1].series("train/loss")] == [4, 5, 6]
    assert starts[1].summary["resumed_from"] == str(ckpt) and starts[1].summary["resumed_from_step"] == 3
    # the printed upload command names both starts, oldest first
    dirs = sorted(find_offline_runs(tmp_path / "wandb"))
    assert resumed.summary["wandb_sync"] == "wandb sync " + " ".join(str(d) for d in dirs)


def test_resume_from_another_run_dir_is_a_new_wandb_run_that_names_its_source(tmp_path: Path) -> None:
    """A fork (or each job of a sweep over one checkpoint) must not log into the source's W&B run:
    their histories would interleave and each would overwrite its config."""
    first = train_run(tmp_path / "a", "train.max_steps=3", OFFLINE)
    resumed = train_run(tmp_path / "b", "train.max_steps=6", f"train.resume={tmp_path / 'a'}", OFFLINE)
    assert resumed.summary["initial_val_loss"] == val_loss_at(first.records, 3)  # not nan: evaluated at step 3
    source, fork = wandb_run_id(tmp_path / "a"), wandb_run_id(tmp_path / "b")
    assert source and fork and source != fork
    run = read_offline_run(tmp_path / "b" / "wandb")
    assert run.run_id == fork
    assert run.summary["resumed_from"] == str(tmp_path / "a" / "checkpoints" / "step_00000003")


def test_a_finished_run_has_nothing_to_do_and_nothing_is_written(tmp_path: Path) -> None:
    train_run(tmp_path / "run", OFFLINE)  # to train.max_steps=6, checkpoint at 6
    before = tree_state(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(NothingToDo, match=f"nothing to do: {run_dir} is at step 6, train.max_steps=6"):
        train_run(tmp_path / "run", "train.resume=auto", OFFLINE)
    with pytest.raises(NothingToDo, match="is at step 6, train.max_steps=4"):
        train_run(tmp_path / "new", f"train.resume={tmp_path / 'run'}", "train.max_steps=4", OFFLINE)
    assert tree_state(tmp_path) == before  # summary.json, metrics.jsonl, W&B files: as they were; no new dir


def test_resume_auto_in_a_directory_new_at_every_start_is_refused_with_the_fix() -> None:
    with pytest.raises(ConfigError) as err:
        require_fixed_run_dir("auto", "hydra.run.dir", "outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}-single")
    assert err.value.setting == "train.resume" and "hydra.run.dir=DIR" in str(err.value)
    require_fixed_run_dir("auto", "hydra.run.dir", "runs/a")
    require_fixed_run_dir("runs/a", "hydra.run.dir", "outputs/${now:%Y-%m-%d}")  # a path names its checkpoint
