"""The token cache and tokenizers read from files: keyed by the tokenizer.json's hash, saved with the shards,
a shard directory of another tokenizer refused, and a BPE trained once by moe-prepare-data for every later start."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import datasets
import pytest
import torch
from datasets import DatasetDict

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, DataConfig
from moe_trainer.config.validate import validate
from moe_trainer.data import ByteTokenizer, load_corpus, tokenize_split
from moe_trainer.data import bpe as bpe_module
from moe_trainer.data.bpe import STORE_DIR, train_bpe
from moe_trainer.data.prepare import prepare
from moe_trainer.data.shards import SPLITS, build_token_cache, cache_key, map_stream
from moe_trainer.data.sources import corpus_source, loaded_identity
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer
from moe_trainer.train.run_tokenizer import resolve_tokenizer
from tests.helpers import tree_state

CFG = DataConfig(seq_len=32, embedded_max_bytes=60_000)
VOCAB = 300


@pytest.fixture(scope="module")
def corpus() -> DatasetDict:
    return load_corpus(CFG)


@pytest.fixture(scope="module")
def bpe(corpus: DatasetDict) -> FileTokenizer:
    return train_bpe(corpus["train"], VOCAB)


def test_a_file_tokenizer_cache_is_keyed_by_its_hash_and_holds_the_file(
        corpus: DatasetDict, bpe: FileTokenizer, tmp_path: Path) -> None:
    directory, index, written = build_token_cache(corpus, bpe, tmp_path)
    identity = loaded_identity(corpus)
    assert written and directory.name == cache_key(identity, bpe) != cache_key(identity, ByteTokenizer())
    assert index.tokenizer_sha256 == bpe.digest and (index.tokenizer, index.vocab_size) == ("bpe", VOCAB)
    saved = (directory / TOKENIZER_FILE).read_bytes()
    assert hashlib.sha256(saved).hexdigest() == bpe.digest  # the shards' ids can be decoded from the directory alone
    for split in SPLITS:
        assert torch.equal(map_stream(directory, index, split).to(torch.int64), tokenize_split(corpus[split], bpe))
    other = train_bpe(corpus["train"], VOCAB + 10)
    assert cache_key(loaded_identity(corpus), other) != directory.name  # another tokenizer never reads these ids


def test_a_shard_directory_of_another_tokenizer_is_refused_before_anything_is_written(
        corpus: DatasetDict, bpe: FileTokenizer, tmp_path: Path, make_config: Callable[..., Config]) -> None:
    directory, _, _ = build_token_cache(corpus, ByteTokenizer(), tmp_path / "cache")
    bpe.save(tmp_path / TOKENIZER_FILE)
    before = tree_state(tmp_path)
    cfg = make_config(f"data.tokenizer={tmp_path / TOKENIZER_FILE}", f"data.token_cache={directory}")
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert err.value.setting == "data.token_cache"
    message = str(err.value)
    assert "made with tokenizer byte" in message and f"not this run's tokenizer bpe ({VOCAB} ids" in message
    assert f"data.token_cache={tmp_path / 'cache'}" in message  # the fix: its root
    with pytest.raises(ConfigError, match="data.token_cache"):  # the library path refuses it too
        build_token_cache(corpus, bpe, directory)
    assert tree_state(tmp_path) == before


def test_prepare_data_trains_the_bpe_once_and_training_starts_load_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, make_config: Callable[..., Config]) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # not the real home
    cache = tmp_path / "tokens"
    overrides = ["data.tokenizer=bpe", f"data.vocab_size={VOCAB}", f"data.embedded_max_bytes={CFG.embedded_max_bytes}"]
    first = prepare(overrides, str(cache))
    (stored,) = (cache / STORE_DIR).glob("bpe-*.json")
    assert first.startswith(f"trained {stored}") and f"tokenizer bpe ({VOCAB} ids" in first

    def no_training(*args: object) -> None:
        raise AssertionError("the BPE was trained again")

    monkeypatch.setattr(bpe_module, "train_bpe", no_training)
    assert prepare(overrides, str(cache)).startswith(f"already trained: {stored}")
    cfg = make_config(*overrides, f"data.token_cache={cache}")
    tokenizer = resolve_tokenizer(cfg, None)  # what moe-train does before any actor starts
    assert isinstance(tokenizer, FileTokenizer) and tokenizer.digest == hashlib.sha256(stored.read_bytes()).hexdigest()
    _, _, written = build_token_cache(corpus_source(cfg.data), tokenizer, cache)  # as each actor looks it up
    assert not written  # the shards moe-prepare-data wrote, found by the key of the same file
