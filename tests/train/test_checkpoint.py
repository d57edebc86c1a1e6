"""Checkpoint integrity, pruning, refusal of damaged or foreign checkpoints, and the NaN guard."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moe_trainer.config.errors import ConfigError
from moe_trainer.driver import TrainingDiverged, run_training
from moe_trainer.engine import LocalEngine
from moe_trainer.outputs import RunOutputs
from moe_trainer.train.checkpoint import list_checkpoints, resolve_resume
from tests.helpers import read_records, train_run


def run(run_dir: Path, *overrides: str) -> dict:
    return train_run(run_dir, *overrides).summary


def test_truncated_checkpoint_is_refused_and_auto_takes_the_earlier_one(tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture) -> None:
    run(tmp_path)  # checkpoints at steps 3 and 6
    newest = tmp_path / "checkpoints" / "step_00000006"
    shard = newest / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "b", f"train.resume={newest}")
    assert err.value.setting == "train.resume" and "truncated" in str(err.value)
    summary = run(tmp_path, "train.resume=auto", "train.max_steps=8")
    assert summary["start_step"] == 3
    assert "skipping damaged checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["foreign_file", "garbage_meta", "empty_dir"])
def test_foreign_or_corrupt_checkpoint_paths_are_refused(tmp_path: Path, damage: str) -> None:
    ckpt = tmp_path / "ckpt" / "step_00000003"
    ckpt.mkdir(parents=True)
    if damage == "foreign_file":
        (ckpt / "meta.json").write_text(json.dumps({"step": 3, "files": {"shard_rank00000.pt": {"bytes": 5}}}))
        (ckpt / "shard_rank00000.pt").write_bytes(b"hello")
    elif damage == "garbage_meta":
        (ckpt / "meta.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "run", f"train.resume={ckpt}")
    assert err.value.setting == "train.resume"
    assert not (tmp_path / "run").exists()


def test_resuming_a_different_model_shape_is_refused(tmp_path: Path) -> None:
    run(tmp_path / "a", "train.max_steps=3")
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "b", "moe.num_experts=8", f"train.resume={tmp_path / 'a'}")
    assert err.value.setting == "train.resume" and "num_experts" in str(err.value)


def test_resuming_with_other_dense_first_blocks_is_refused(tmp_path: Path) -> None:
    """``moe.first_dense`` changes which blocks hold experts: a checkpoint made without it is another model."""
    run(tmp_path / "a", "train.max_steps=3")
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "b", "moe.first_dense=1", f"train.resume={tmp_path / 'a'}")
    assert err.value.setting == "train.resume" and "first_dense" in str(err.value)


CAPACITY = "moe.capacity_factor=1.0"  # capacity is per routing group: the group size is part of the objective


@pytest.mark.parametrize("change,setting", [
    ("moe.aux_loss_scope=group", "moe.aux_loss_scope"),
    ("moe.group_sequences=2", "moe.group_sequences"),
    ("moe.group_sequences=null", "moe.group_sequences"),  # single's one group of 4 sequences: another objective
    ("train.grad_accum_steps=2", "train.grad_accum_steps"),  # the global aux loss counts each pass's rows
])
def test_resuming_under_another_objective_is_refused_naming_the_setting(tmp_path: Path, change: str,
                                                                       setting: str) -> None:
    run(tmp_path / "a", "train.max_steps=3", CAPACITY)
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "b", CAPACITY, change, f"train.resume={tmp_path / 'a'}")
    assert err.value.setting == setting and "different objective" in str(err.value)
    assert not (tmp_path / "b").exists()  # refused before anything was written


@pytest.mark.parametrize("first,second", [
    # null with 1 sequence per micro-batch is the same group size as 1
    ([CAPACITY, "train.batch_size=1"], [CAPACITY, "train.batch_size=1", "moe.group_sequences=null"]),
    # dropless token choice with the global loss uses no groups at all
    ([], ["moe.group_sequences=null"]),
    # per-group losses and capacities: accumulation is the large batch exactly
    ([CAPACITY, "moe.aux_loss_scope=group"], [CAPACITY, "moe.aux_loss_scope=group", "train.grad_accum_steps=4"]),
])
def test_an_objective_that_does_not_change_resumes(tmp_path: Path, first: list[str], second: list[str]) -> None:
    run(tmp_path / "a", "train.max_steps=3", *first)
    summary = run(tmp_path / "b", *second, f"train.resume={tmp_path / 'a'}")
    assert summary["start_step"] == 3


def test_a_checkpoint_from_before_accumulation_was_recorded_resumes_as_one_pass(tmp_path: Path) -> None:
    run(tmp_path / "a", "train.max_steps=3")
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["objective"]["train.grad_accum_steps"]  # as written before the setting existed: one pass
    (ckpt / "meta.json").write_text(json.dumps(meta))
    assert run(tmp_path / "b", f"train.resume={ckpt}")["start_step"] == 3
    with pytest.raises(ConfigError) as err:
        run(tmp_path / "c", "train.grad_accum_steps=2", f"train.resume={ckpt}")
    assert err.value.setting == "train.grad_accum_steps"


def test_a_checkpoint_without_a_recorded_objective_is_refused_with_the_reason(tmp_path: Path) -> None:
    run(tmp_path / "a", "train.max_steps=3")
    ckpt = tmp_path / "a" / "checkpoints" / "step_00000003"
    meta = json.loads((ckpt / "meta.json").read_text())
    del meta["objective"]  # as written before objectives were recorded
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="predates recorded training objectives") as err:
        run(tmp_path / "b", f"train.resume={ckpt}")
    assert err.value.setting == "train.resume"


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    run(tmp_path, "train.max_steps=12", "train.checkpoint_every=2", "train.keep_last=2")
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000010", "step_00000012"]


def poisoned_engine(make_config, tmp_path: Path, on_nan: str,
                    *overrides: str) -> tuple[LocalEngine, RunOutputs, object]:
    """Trained and checkpointed to step 3, then one weight set to NaN: every later step is non-finite."""
    cfg = make_config(f"train.on_nan={on_nan}", "train.max_steps=6", *overrides)
    engine = LocalEngine(cfg)
    outputs = RunOutputs(tmp_path, {}, cfg.logger, "single")
    engine.train(3)
    engine.save(tmp_path / "checkpoints")
    with torch.no_grad():
        engine.trainer.model.lm_head.weight[0, 0] = float("nan")
    return engine, outputs, cfg


def logged(tmp_path: Path) -> list[dict]:
    return read_records(tmp_path)


def checkpoints(tmp_path: Path) -> list[str]:
    return [p.name for p in list_checkpoints(tmp_path / "checkpoints")]


def diverging_run(make_config, tmp_path: Path, on_nan: str, match: str, *overrides: str) -> tuple[LocalEngine, str]:
    """Trains the poisoned engine until the run stops; returns the engine and the error message."""
    engine, outputs, cfg = poisoned_engine(make_config, tmp_path, on_nan, *overrides)
    with pytest.raises(TrainingDiverged, match=match) as err:
        run_training(cfg, engine, outputs)
    outputs.close()
    return engine, str(err.value)


def test_nan_loss_stops_at_that_step_with_the_last_good_checkpoint_intact(make_config, tmp_path: Path) -> None:
    first = tmp_path / "checkpoints" / "step_00000003"
    # one chunk covers steps 4-6: the run must stop after step 4, not after the chunk
    engine, outputs, cfg = poisoned_engine(make_config, tmp_path, "stop", "train.log_every=3")
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    embed_before = engine.trainer.model.embed.weight.detach().clone()
    with pytest.raises(TrainingDiverged, match="train.on_nan=stop") as err:
        run_training(cfg, engine, outputs)
    outputs.close()
    assert engine.step == 4 and str(first) in str(err.value)
    assert [r["step"] for r in logged(tmp_path) if r.get("step_skipped")] == [4]
    assert checkpoints(tmp_path) == ["step_00000003"]
    assert before == {p.name: p.read_bytes() for p in first.iterdir()}
    assert torch.equal(engine.trainer.model.embed.weight, embed_before)  # the bad update was not applied


def test_skip_stops_after_max_skipped_steps_in_a_row(make_config, tmp_path: Path) -> None:
    engine, message = diverging_run(make_config, tmp_path, "skip", "train.max_skipped_steps=2",  # match, then
                                    "train.max_skipped_steps=2", "train.log_every=3")  # the overrides
    assert engine.step == 5 and "step_00000003" in message
    assert checkpoints(tmp_path) == ["step_00000003"]


def test_non_finite_state_is_never_saved_and_the_last_finite_checkpoint_is_kept(make_config, tmp_path: Path) -> None:
    engine, message = diverging_run(make_config, tmp_path, "skip", "not saved", "train.max_skipped_steps=100",
                                    "train.keep_last=1")
    assert engine.step == 6  # every step skipped, up to the save at the end
    assert "model/lm_head.weight" in message and "step_00000003" in message
    assert checkpoints(tmp_path) == ["step_00000003"]
    assert resolve_resume("auto", tmp_path) == tmp_path / "checkpoints" / "step_00000003"


def test_a_transient_nan_skips_the_update_and_training_goes_on(make_config, tmp_path: Path) -> None:
    engine, outputs, cfg = poisoned_engine(make_config, tmp_path, "skip")
    embed_before = engine.trainer.model.embed.weight.detach().clone()
    weight = engine.trainer.model.lm_head.weight
    assert engine.train(1)[0]["step_skipped"]
    assert torch.equal(engine.trainer.model.embed.weight, embed_before)  # the update was not applied
    with torch.no_grad():
        weight[0, 0] = 0.0  # the cause goes away
    summary = run_training(cfg, engine, outputs)
    outputs.close()
    assert summary["steps"] == 6
    assert not any(r.get("step_skipped") for r in logged(tmp_path))
    assert checkpoints(tmp_path)[-1] == "step_00000006"
