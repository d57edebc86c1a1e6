"""``data.tokenizer=bpe`` through ``moe-train``: trained once by the driver on the training split, saved in the run
directory and every checkpoint, used (never retrained) on resume, and refused when the settings disagree with it."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from datasets import Dataset

import moe_trainer.cli
from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import DataConfig
from moe_trainer.data import bpe as bpe_module
from moe_trainer.data import load_corpus
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer
from moe_trainer.engine import model_parameter_counts
from moe_trainer.launch_gate import check_start
from moe_trainer.train.run_tokenizer import checkpoint_tokenizer, resolve_tokenizer
from tests.conftest import compose_dict
from tests.helpers import RunResult, train_run, tree_state

VOCAB = 300
BPE = ("data.tokenizer=bpe", f"data.vocab_size={VOCAB}")


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunResult]:
    """experiment=debug with a BPE: 6 steps, checkpoints at 3 and 6."""
    run_dir = tmp_path_factory.mktemp("bpe") / "run"
    return run_dir, train_run(run_dir, *BPE)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_run_dir_and_every_checkpoint_hold_the_tokenizer_and_it_sizes_the_model(
        bpe_run: tuple[Path, RunResult], make_config: object) -> None:
    run_dir, run = bpe_run
    tokenizer = FileTokenizer.from_file(run_dir / TOKENIZER_FILE)
    assert tokenizer.name == "bpe" and tokenizer.vocab_size == VOCAB
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000003", "step_00000006"]
    for checkpoint in checkpoints:
        meta = json.loads((checkpoint / "meta.json").read_text())
        assert sha256(checkpoint / TOKENIZER_FILE) == tokenizer.digest
        assert meta["files"][TOKENIZER_FILE]["sha256"] == tokenizer.digest  # the checksums cover it
        assert meta["tokenizer_sha256"] == tokenizer.digest and meta["vocab_size"] == VOCAB
    # embedding and LM head have one row per id of the tokenizer (257 with bytes)
    byte = model_parameter_counts(make_config(), 257)["params_total"]  # type: ignore[operator]
    assert run.summary["params_total"] - byte == 2 * (VOCAB - 257) * 32  # debug: d_model 32


def test_resume_uses_the_checkpoint_tokenizer_and_continues_the_same_losses(
        bpe_run: tuple[Path, RunResult], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir, uninterrupted = bpe_run

    def no_training(*args: object) -> None:
        raise AssertionError("a resumed run trained its tokenizer again")

    monkeypatch.setattr(bpe_module, "train_bpe", no_training)
    resumed = train_run(tmp_path / "b", *BPE, f"train.resume={run_dir / 'checkpoints' / 'step_00000003'}")
    assert sha256(tmp_path / "b" / TOKENIZER_FILE) == sha256(run_dir / TOKENIZER_FILE)
    assert [s for s in resumed.losses] == [4, 5, 6]
    assert resumed.losses == {s: uninterrupted.losses[s] for s in (4, 5, 6)}


def test_the_bpe_is_trained_on_the_training_split_only(monkeypatch: pytest.MonkeyPatch, make_config: object,
                                                       tmp_path: Path) -> None:
    cfg = make_config(*BPE, f"data.token_cache={tmp_path}")  # type: ignore[operator]  # nothing stored yet
    seen: list[Dataset] = []
    real = bpe_module.train_bpe

    def recording(train: Dataset, vocab_size: int) -> FileTokenizer:
        seen.append(train)
        return real(train, vocab_size)

    monkeypatch.setattr(bpe_module, "train_bpe", recording)
    resolve_tokenizer(cfg, None)
    corpus = load_corpus(cfg.data)
    assert [d._fingerprint for d in seen] == [corpus["train"]._fingerprint] != [corpus["validation"]._fingerprint]


def _bad_resumes(run_dir: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each start that must be refused: its overrides and the setting the message names."""
    other = tmp_path / "other.json"  # a tokenizer the checkpoint was not trained with
    bpe_module.train_bpe(Dataset.from_dict({"text": ["some other text"] * 20}), 270).save(other)
    altered = tmp_path / "altered"  # a copy of the checkpoint whose tokenizer.json was rewritten after saving
    shutil.copytree(run_dir / "checkpoints" / "step_00000003", altered)
    (altered / TOKENIZER_FILE).write_text(json.dumps(json.loads((altered / TOKENIZER_FILE).read_text()), indent=2))
    resume = f"train.resume={run_dir / 'checkpoints' / 'step_00000003'}"
    return {
        "byte on a BPE checkpoint": (["data.tokenizer=byte", resume], "data.tokenizer"),
        # fewer ids than the checkpoint's BPE holds: certainly another size (a larger request may only
        # mean the corpus ran out of merges, test_a_bpe_that_stopped_short_resumes_with_its_request)
        "another vocabulary size": (["data.tokenizer=bpe", "data.vocab_size=280", resume], "data.vocab_size"),
        "another tokenizer.json": ([f"data.tokenizer={other}", resume], "data.tokenizer"),
        "an altered tokenizer.json": ([*BPE, f"train.resume={altered}"], "train.resume"),
    }


def test_a_tokenizer_the_checkpoint_disagrees_with_is_refused_and_nothing_is_written(
        bpe_run: tuple[Path, RunResult], tmp_path: Path) -> None:
    run_dir, _ = bpe_run
    cases = _bad_resumes(run_dir, tmp_path)
    before = tree_state(tmp_path), tree_state(run_dir)
    for case, (overrides, setting) in cases.items():
        with pytest.raises(ConfigError) as err:
            train_run(tmp_path / "new", *overrides)
        assert err.value.setting == setting, (case, str(err.value))
        assert (tree_state(tmp_path), tree_state(run_dir)) == before, case
    # the launch gate refuses them too, before Hydra writes into the run directory
    with pytest.raises(ConfigError, match="not the byte tokenizer"):
        check_start(compose_dict(["experiment=debug", f"hydra.run.dir={run_dir}", "train.resume=auto",
                                  "train.max_steps=9"], with_hydra=True), "hydra.run.dir", True)


def test_a_byte_checkpoint_refuses_another_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trained with the byte tokenizer") as err:
        checkpoint_tokenizer(DataConfig(tokenizer="bpe"), tmp_path)  # a checkpoint without tokenizer.json
    assert err.value.setting == "data.tokenizer" and "data.tokenizer=byte" in str(err.value)


def test_a_start_refused_after_the_tokenizer_was_installed_leaves_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refused(cfg: object) -> None:
        raise ConfigError("data.seq_len", 32, "refused by the engine (as a too short split is)")

    monkeypatch.setattr(moe_trainer.cli, "make_engine", refused)
    with pytest.raises(ConfigError, match="refused by the engine"):
        train_run(tmp_path / "deep" / "run", *BPE)
    assert list(tmp_path.iterdir()) == []  # neither the tokenizer.json nor the directories made for it


def test_a_run_dir_of_another_tokenizer_is_not_overwritten(bpe_run: tuple[Path, RunResult], tmp_path: Path) -> None:
    shutil.copy(bpe_run[0] / TOKENIZER_FILE, tmp_path / TOKENIZER_FILE)
    before = tree_state(tmp_path)
    with pytest.raises(ConfigError, match="already holds another tokenizer.json"):
        train_run(tmp_path, "data.tokenizer=bpe", "data.vocab_size=280")
    assert tree_state(tmp_path) == before


def test_a_bpe_that_stopped_short_resumes_with_its_request(tmp_path: Path) -> None:
    """A BPE asked for 8192 ids on a tiny corpus has fewer; resuming with the same request must work."""
    small = bpe_module.train_bpe(Dataset.from_dict({"text": ["a tiny corpus of a few words"] * 30}), 8192)
    assert small.vocab_size < 8192
    checkpoint = tmp_path / "step_00000001"
    checkpoint.mkdir()
    small.save(checkpoint / TOKENIZER_FILE)
    got = checkpoint_tokenizer(DataConfig(tokenizer="bpe", vocab_size=8192, token_cache=None), checkpoint)
    assert got.digest == small.digest
