"""Checkpoints through torch.distributed.checkpoint: what a rank reads, what loading refuses, background saves.

Resharding across strategies and actor counts is ``tests/actors/test_reliability.py``; damaged
checkpoints in general (truncated, foreign, other model) are ``tests/train/test_checkpoint.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint.filesystem as dcp_filesystem

from moe_trainer.config.errors import ConfigError
from moe_trainer.data import build_batch_source, build_tokenizer
from moe_trainer.engine import LocalEngine, build_model
from moe_trainer.moe.dispatcher import Dispatcher, LocalTransport
from moe_trainer.train.checkpoint import checkpoint_problems, list_checkpoints, save_checkpoint
from moe_trainer.train.checkpoint_io import CheckpointWriteError
from moe_trainer.train.safe_metadata import SafeFileSystemReader, load_metadata
from moe_trainer.train.sharded_checkpoint import load_into, read_entries
from moe_trainer.train.trainer import SingleContext, Trainer
from tests.helpers import train_run

FOUR_EXPERTS = "moe.num_experts=4"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``single`` run of 4 experts, checkpointed at steps 3 and 6 (the debug experiment)."""
    run_dir = tmp_path_factory.mktemp("saved")
    train_run(run_dir, FOUR_EXPERTS)
    return run_dir / "checkpoints" / "step_00000006"


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_checksums(ckpt: Path) -> None:
    """Re-records every file in meta.json, as someone who altered a checkpoint on purpose would."""
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"] = {}
    for f in sorted(ckpt.iterdir()):
        if f.name != "meta.json":
            meta["files"][f.name] = {"bytes": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ckpt / "meta.json").write_text(json.dumps(meta))


def test_a_checkpoint_is_dcp_files_with_every_checksum_in_meta_json(saved: Path) -> None:
    meta = json.loads((saved / "meta.json").read_text())
    assert sorted(meta["files"]) == [".metadata", "__0_0.distcp"]
    assert checkpoint_problems(saved) == []
    entries = read_entries(saved)
    assert "model/blocks.0.ffn.experts.w_down_EFD/expert3" in entries and int(entries["trainer/step"]) == 6


@pytest.mark.parametrize("damage,words", [
    ("flip", "checksum"),  # same size, other bytes
    ("truncate", "truncated"),
    ("delete", "missing"),
])
def test_a_damaged_data_or_metadata_file_is_one_config_error(saved: Path, tmp_path: Path, damage: str,
                                                            words: str) -> None:
    for name in (".metadata", "__0_0.distcp"):
        ckpt = _copy(saved, tmp_path / name / "step_00000006")
        f = ckpt / name
        data = f.read_bytes()
        if damage == "flip":
            f.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
        elif damage == "truncate":
            f.write_bytes(data[: len(data) // 2])
        else:
            f.unlink()
        with pytest.raises(ConfigError) as err:
            train_run(tmp_path / name / "run", FOUR_EXPERTS, "train.max_steps=8", f"train.resume={ckpt}")
        assert err.value.setting == "train.resume" and words in str(err.value) and name in str(err.value)
        assert not (tmp_path / name / "run").exists()


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious ``.metadata`` would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_metadata_that_would_run_code_is_refused_and_nothing_runs(saved: Path, tmp_path: Path) -> None:
    ckpt = _copy(saved, tmp_path / "evil" / "step_00000006")
    marker = tmp_path / "it_ran"
    (ckpt / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))
    _rewrite_checksums(ckpt)  # the checksums cannot tell: the file was replaced along with them
    with pytest.raises(ConfigError) as err:
        train_run(tmp_path / "run", FOUR_EXPERTS, "train.max_steps=8", f"train.resume={ckpt}")
    assert err.value.setting == "train.resume"
    assert "refused" in str(err.value) and ".system" in str(err.value)  # os.system pickles as posix.system
    with pytest.raises(ConfigError):
        SafeFileSystemReader(ckpt).read_metadata()  # DCP's own entry point is the restricted one too
    assert not marker.exists()


def test_metadata_of_another_type_is_refused(saved: Path, tmp_path: Path) -> None:
    ckpt = _copy(saved, tmp_path / "other" / "step_00000006")
    (ckpt / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(ConfigError, match="holds a dict, not torch.distributed.checkpoint metadata"):
        load_metadata(ckpt)


def _expert_rank_trainer(make_config: Any, expert_range: tuple[int, int]) -> Trainer:
    """What an expert-parallel rank holds (dense part, experts ``expert_range``), built without process groups.

    ``expert_range``: (first global expert, how many), as the model takes it.
    """
    cfg = make_config(FOUR_EXPERTS)
    dispatcher = Dispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor, LocalTransport())
    model = build_model(cfg, build_tokenizer(cfg.data.tokenizer).vocab_size, dispatcher=dispatcher,
                        expert_range=expert_range)
    return Trainer(cfg, model, build_batch_source(cfg.data, cfg.train.batch_size, cfg.train.seed),
                   SingleContext(torch.device("cpu")))


def test_a_rank_reads_only_its_experts_and_the_dense_part(make_config: Any, saved: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []
    real_read = SafeFileSystemReader.read_data

    def spy(self: SafeFileSystemReader, plan: Any, planner: Any) -> Any:
        read.extend(item.storage_index.fqn for item in plan.items)
        return real_read(self, plan, planner)

    monkeypatch.setattr(SafeFileSystemReader, "read_data", spy)
    trainer = _expert_rank_trainer(make_config, (2, 2))
    load_into(saved, trainer)
    read_keys = set(read)
    monkeypatch.undo()
    entries = read_entries(saved)
    own_experts = {k for k in entries if k.endswith(("/expert2", "/expert3"))}  # weights and both moments
    dense = {k for k in entries if "/expert" not in k}  # model, AdamW state and the counters
    assert own_experts and dense
    assert read_keys == dense | own_experts  # and nothing of experts 0 and 1
    # what was read landed where it belongs: expert 3 is the shard's second expert
    w = trainer.model.blocks[0].ffn.experts.w_down_EFD
    assert torch.equal(w[1], entries["model/blocks.0.ffn.experts.w_down_EFD/expert3"])
    moment = trainer.optimizer.state[w]["exp_avg_sq"]
    assert torch.equal(moment[0], entries["optim.exp_avg_sq/blocks.0.ffn.experts.w_down_EFD/expert2"])
    assert trainer.step == 6


def test_a_layout_with_more_experts_than_saved_names_the_missing_entry(make_config: Any, saved: Path) -> None:
    trainer = _expert_rank_trainer(make_config, (2, 2))
    entries = read_entries(saved)
    legacy = saved.parent.parent / "legacy_fewer"
    meta = {k: v for k, v in json.loads((saved / "meta.json").read_text()).items() if k not in ("step", "files")}
    kept = {k: v for k, v in entries.items() if not k.endswith("/expert3")}
    ckpt = save_checkpoint(legacy, 6, lambda d: torch.save(kept, d / "shard_rank00000.pt"), meta)
    with pytest.raises(ConfigError, match="missing from the checkpoint") as err:
        load_into(ckpt, trainer)
    assert err.value.setting == "train.resume" and err.value.value.endswith("/expert3")


def test_a_checkpoint_of_the_earlier_format_still_resumes(make_config: Any, saved: Path, tmp_path: Path) -> None:
    """``shard_rank*.pt`` checkpoints (one torch.save per rank, before DCP) load, the old way."""
    entries = read_entries(saved)
    meta = {k: v for k, v in json.loads((saved / "meta.json").read_text()).items() if k not in ("step", "files")}
    dense = {k: v for k, v in entries.items() if "/expert" not in k or k.endswith(("/expert0", "/expert1"))}
    rest = {k: v for k, v in entries.items() if k not in dense}

    def write_old_format(d: Path) -> None:
        torch.save(dense, d / "shard_rank00000.pt")
        torch.save(rest, d / "shard_rank00001.pt")

    legacy = save_checkpoint(tmp_path / "checkpoints", 6, write_old_format, meta)
    cfg = make_config(FOUR_EXPERTS, "train.max_steps=8")
    from_dcp, from_legacy = LocalEngine(cfg), LocalEngine(cfg)
    from_dcp.load(saved)
    from_legacy.load(legacy)
    assert from_legacy.step == 6
    for a, b in zip(from_dcp.train(2), from_legacy.train(2), strict=True):
        assert a["loss"] == b["loss"]


def test_a_background_save_writes_what_a_blocking_one_writes(saved: Path, tmp_path: Path) -> None:
    """The step-3 checkpoint was written while steps 4-6 trained: it must hold step 3's state exactly."""
    train_run(tmp_path, FOUR_EXPERTS, "train.async_checkpoint=true")
    ckpts = list_checkpoints(tmp_path / "checkpoints")
    assert [p.name for p in ckpts] == ["step_00000003", "step_00000006"]
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))
    for ckpt in ckpts:
        assert checkpoint_problems(ckpt) == []
        want = read_entries(saved.parent / ckpt.name)
        got = read_entries(ckpt)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (ckpt.name, key)


def test_a_background_save_is_a_checkpoint_only_once_its_writes_completed(make_config: Any, tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    engine = LocalEngine(make_config(FOUR_EXPERTS))
    engine.train(1)
    root = tmp_path / "checkpoints"
    engine.save_in_background(root)
    assert list_checkpoints(root) == [] and not (root / "step_00000001").exists()  # written, not yet final
    engine.train(1)  # training goes on meanwhile
    assert engine.finish_save() == root / "step_00000001"
    assert checkpoint_problems(root / "step_00000001") == []
    assert int(read_entries(root / "step_00000001")["trainer/step"]) == 1

    def failing_write(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(dcp_filesystem, "_write_item", failing_write)
    engine.save_in_background(root)
    with pytest.raises(CheckpointWriteError, match="failed on rank 0: OSError: disk full"):
        engine.finish_save()
    assert [p.name for p in list_checkpoints(root)] == ["step_00000001"]  # the failed one never became one
    assert not list(root.glob(".tmp-*")) and not (root / "step_00000002").exists()
