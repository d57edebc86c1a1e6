"""Batches: deterministic by (seed, step), rank shards that add up to the global batch, fixed validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import DataConfig
from moe_trainer.data import EOD_ID, BatchSource, ByteTokenizer, build_batch_source, load_corpus, step_seed
from moe_trainer.data.batches import tokenize_split

SEQ_LEN, BATCH = 64, 8
CFG = DataConfig(seq_len=SEQ_LEN, embedded_max_bytes=300_000, token_cache=None)  # in memory


@pytest.fixture(scope="module")
def corpus() -> DatasetDict:
    return load_corpus(CFG)


@pytest.fixture(scope="module")
def source(corpus: DatasetDict) -> BatchSource:
    return build_batch_source(CFG, batch_size=BATCH, seed=1234, corpus=corpus)


def test_tokenize_split_puts_eod_after_every_document() -> None:
    ds = Dataset.from_dict({"text": ["ab", "c"]})
    stream = tokenize_split(ds, ByteTokenizer())
    assert stream.dtype == torch.int64 and stream.tolist() == [97, 98, EOD_ID, 99, EOD_ID]


def test_streams_hold_every_document(corpus: DatasetDict, source: BatchSource) -> None:
    n_bytes = sum(len(t.encode("utf-8")) for t in corpus["train"]["text"])
    assert source.train_tokens.numel() == n_bytes + len(corpus["train"])
    assert int((source.val_tokens == EOD_ID).sum()) == len(corpus["validation"])
    assert source.vocab_size == 257


def test_train_batch_shapes_and_shift(source: BatchSource) -> None:
    inputs, targets = source.train_batch(0)
    assert inputs.shape == targets.shape == (BATCH, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    starts = source.global_starts(0)
    for row, start in enumerate(starts.tolist()):
        window = source.train_tokens[start : start + SEQ_LEN + 1]
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


def test_train_batch_is_real_text(source: BatchSource) -> None:
    text = source.tokenizer.decode(source.train_batch(5)[0].flatten())
    assert "\ufffd" not in text[:50] or text.count("\ufffd") < 10
    assert any(word in text for word in ("def", "self", "import", "return", "the"))


def test_train_batch_depends_only_on_seed_and_step(corpus: DatasetDict, source: BatchSource) -> None:
    first = source.train_batch(7)
    source.train_batch(3)  # reading other steps in between changes nothing (no hidden RNG state)
    assert all(torch.equal(a, b) for a, b in zip(first, source.train_batch(7), strict=True))
    resumed = build_batch_source(CFG, batch_size=BATCH, seed=1234, corpus=corpus)  # a restarted process
    assert torch.equal(resumed.train_batch(7)[0], first[0])
    assert not torch.equal(source.train_batch(8)[0], first[0])
    other_seed = build_batch_source(CFG, batch_size=BATCH, seed=1235, corpus=corpus)
    assert not torch.equal(other_seed.train_batch(7)[0], first[0])


def test_step_seed_mixes_seed_and_step() -> None:
    seeds = {step_seed(seed, step) for seed in range(20) for step in range(20)}
    assert len(seeds) == 400 and all(0 <= s < 2**63 for s in seeds)
    assert step_seed(-1, 0) >= 0


@pytest.mark.parametrize("world", [2, 4, 8])
def test_rank_shards_concatenate_to_the_global_batch(source: BatchSource, world: int) -> None:
    for step in (0, 11):
        inputs, targets = source.train_batch(step)
        shards = [source.train_batch(step, rank=r, world=world) for r in range(world)]
        assert all(s[0].shape == (BATCH // world, SEQ_LEN) for s in shards)
        assert torch.equal(torch.cat([s[0] for s in shards]), inputs)
        assert torch.equal(torch.cat([s[1] for s in shards]), targets)


def test_batch_size_must_divide_by_world(source: BatchSource) -> None:
    with pytest.raises(ConfigError) as err:
        source.train_batch(0, rank=0, world=3)
    assert err.value.setting == "train.batch_size" and err.value.value == BATCH
    with pytest.raises(ValueError, match="rank"):
        source.train_batch(0, rank=2, world=2)


def test_val_batches_are_fixed_and_span_the_split(source: BatchSource) -> None:
    batches = source.val_batches(4, 6)
    again = source.val_batches(4, 6)
    assert len(batches) == 4
    for (x, y), (x2, y2) in zip(batches, again, strict=True):
        assert x.shape == y.shape == (6, SEQ_LEN)
        assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(batches[0][0][0], source.val_tokens[:SEQ_LEN])  # first window at the start
    assert torch.equal(batches[-1][1][-1], source.val_tokens[-SEQ_LEN:])  # last window at the end
    _ = source.train_batch(99)  # training draws do not disturb validation
    assert torch.equal(source.val_batches(4, 6)[2][0], batches[2][0])


def test_val_batches_shard_by_rank(source: BatchSource) -> None:
    full = source.val_batches(3, 8)
    halves = [source.val_batches(3, 8, rank=r, world=2) for r in range(2)]
    for i in range(3):
        assert torch.equal(torch.cat([halves[0][i][0], halves[1][i][0]]), full[i][0])


def test_stream_shorter_than_a_window_names_seq_len() -> None:
    tokens = torch.arange(50)
    with pytest.raises(ConfigError) as err:
        BatchSource(tokens, tokens, seq_len=50, batch_size=2, seed=0, tokenizer=ByteTokenizer())
    assert err.value.setting == "data.seq_len" and "50 tokens" in str(err.value)
    exact = BatchSource(
        torch.arange(51), torch.arange(51), seq_len=50, batch_size=2, seed=0, tokenizer=ByteTokenizer()
    )
    x, y = exact.train_batch(0)
    assert torch.equal(x[0], torch.arange(50)) and torch.equal(y[0], torch.arange(1, 51))


def test_short_local_corpus_fails_on_seq_len(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("short one\n")
    (tmp_path / "b.txt").write_text("short two\n")
    cfg = DataConfig(paths=[str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], seq_len=128)
    pattern = r"data.seq_len=128: the (train|validation) split has only 11 tokens"
    with pytest.raises(ConfigError, match=pattern):
        build_batch_source(cfg, batch_size=2, seed=0, cache_dir=str(tmp_path / "cache"))


def test_unknown_tokenizer_is_a_config_error(corpus: DatasetDict) -> None:
    with pytest.raises(ConfigError, match="data.tokenizer"):
        build_batch_source(DataConfig(tokenizer="gpt2"), batch_size=2, seed=0, corpus=corpus)
