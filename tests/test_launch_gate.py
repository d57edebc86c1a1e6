"""The checks Hydra's ``on_run_start`` makes before anything is written, on configs composed as ``moe-train`` does."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.launch_gate import check_start
from moe_trainer.train.resume import NothingToDo
from tests.conftest import compose_dict
from tests.helpers import train_run


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("finished")
    train_run(run_dir)  # experiment=debug: 6 steps, checkpoint at 6
    return run_dir


def gate(*overrides: str, key: str = "hydra.run.dir", job_dir_known: bool = True) -> None:
    check_start(compose_dict(["experiment=debug", *overrides], with_hydra=True), key, job_dir_known)


def test_a_finished_run_dir_has_nothing_to_do(finished: Path) -> None:
    with pytest.raises(NothingToDo, match=f"{finished} is at step 6, train.max_steps=6"):
        gate(f"hydra.run.dir={finished}", "train.resume=auto")
    gate(f"hydra.run.dir={finished}", "train.resume=auto", "train.max_steps=7")  # one step left: goes on
    gate(f"hydra.run.dir={finished}")  # no resume: a new run into that dir is train's business


def test_a_wrong_setting_is_refused_even_with_nothing_to_do(finished: Path) -> None:
    with pytest.raises(ConfigError) as err:
        gate(f"hydra.run.dir={finished}", "train.resume=auto", "moe.top_k=9")
    assert err.value.setting == "moe.top_k"


def test_resume_auto_needs_a_fixed_run_or_sweep_dir(finished: Path) -> None:
    for key, job_dir_known in (("hydra.run.dir", True), ("hydra.sweep.dir", False)):
        with pytest.raises(ConfigError, match=f"{key}=DIR") as err:
            gate("train.resume=auto", key=key, job_dir_known=job_dir_known)
        assert err.value.setting == "train.resume"
    gate(f"train.resume={finished}", "train.max_steps=7")  # a path names its checkpoint: any run dir will do
    gate(f"hydra.sweep.dir={finished}", "train.resume=auto", key="hydra.sweep.dir", job_dir_known=False)


def test_a_path_without_checkpoints_is_refused_before_hydra_writes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        gate(f"hydra.run.dir={tmp_path / 'new'}", f"train.resume={tmp_path}")
    assert err.value.setting == "train.resume"


def test_a_run_with_steps_left_is_let_through_without_hashing_its_checkpoints(
        finished: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The start verifies the checkpoint it loads anyway; the gate reads only ``meta.json`` then."""
    import moe_trainer.train.checkpoint as checkpoint

    def no_hashing(path: Path) -> list[str]:
        raise AssertionError(f"the gate hashed {path}")

    monkeypatch.setattr(checkpoint, "checkpoint_problems", no_hashing)
    gate(f"hydra.run.dir={finished}", "train.resume=auto", "train.max_steps=7")
    with pytest.raises(AssertionError, match="the gate hashed"):  # at max_steps it must verify before "done"
        gate(f"hydra.run.dir={finished}", "train.resume=auto")
