"""Token cache: the same stream as in memory, the smallest dtype, atomic and shared writes, the CLI."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import DataConfig, to_dataclass
from moe_trainer.data import BatchSource, ByteTokenizer, build_batch_source, load_corpus, sources, tokenize_split
from moe_trainer.data.prepare import main as prepare_main
from moe_trainer.data.shards import (
    INDEX_NAME,
    SPLITS,
    _host,
    _publish,
    build_token_cache,
    cache_key,
    map_stream,
    read_index,
    refuse_corrupted_cache,
    token_dtype,
)
from moe_trainer.data.sources import loaded_identity, source_identity
from tests.conftest import compose_dict

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, BATCH = 32, 8
CFG = DataConfig(seq_len=SEQ_LEN, embedded_max_bytes=200_000, token_cache=None)  # in memory


@pytest.fixture(scope="module")
def corpus() -> DatasetDict:
    return load_corpus(CFG)


class WideTokenizer(ByteTokenizer):
    """Bytes shifted past 65535, so only a uint32 file can hold them."""

    name = "wide"
    vocab_size = 70_000
    eod_id = 69_999

    def encode(self, text: str) -> np.ndarray:
        return super().encode(text) + 65_600


def test_token_dtype_is_the_smallest_that_holds_the_vocabulary() -> None:
    assert token_dtype(257) == np.dtype("<u2") and token_dtype(65_536) == np.dtype("<u2")
    assert token_dtype(65_537) == np.dtype("<u4")


@pytest.mark.parametrize("tokenizer", [ByteTokenizer(), WideTokenizer()], ids=["uint16", "uint32"])
def test_cached_stream_is_tokenize_split(corpus: DatasetDict, tokenizer: ByteTokenizer, tmp_path: Path) -> None:
    directory, index, written = build_token_cache(corpus, tokenizer, tmp_path)
    assert written and directory == tmp_path / cache_key(loaded_identity(corpus), tokenizer)
    assert index.dtype == token_dtype(tokenizer.vocab_size).str
    for split in SPLITS:
        stream = map_stream(directory, index, split)
        assert stream.dtype == (torch.uint16 if tokenizer.vocab_size <= 65_536 else torch.uint32)
        assert torch.equal(stream.to(torch.int64), tokenize_split(corpus[split], tokenizer))
    assert sorted(p.name for p in directory.iterdir()) == sorted([INDEX_NAME, "train.bin", "validation.bin"])


def test_several_processes_give_the_same_stream(corpus: DatasetDict, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("moe_trainer.data.shards.SMALL_TEXT_BYTES", 0)  # force num_proc=2 on a small corpus
    directory, index, _ = build_token_cache(corpus, ByteTokenizer(), tmp_path, num_proc=2)
    stream = map_stream(directory, index, "train")
    assert torch.equal(stream.to(torch.int64), tokenize_split(corpus["train"], ByteTokenizer()))


def test_batches_match_the_in_memory_path(corpus: DatasetDict, tmp_path: Path) -> None:
    memory = build_batch_source(CFG, batch_size=BATCH, seed=7, corpus=corpus)
    mapped = build_batch_source(DataConfig(seq_len=SEQ_LEN, embedded_max_bytes=200_000, token_cache=str(tmp_path)),
                                batch_size=BATCH, seed=7, corpus=corpus)
    assert mapped.train_tokens.dtype == torch.uint16 and mapped.val_tokens.dtype == torch.uint16
    assert memory.train_tokens.dtype == torch.int64
    for world in (1, 2, 4):
        for rank in range(world):
            for step in (0, 1, 5, 100):
                for a, b in zip(memory.train_batch(step, rank, world), mapped.train_batch(step, rank, world),
                                strict=True):
                    assert b.dtype == torch.int64 and torch.equal(a, b)
            for (a_in, a_out), (b_in, b_out) in zip(memory.val_batches(3, BATCH, rank, world),
                                                    mapped.val_batches(3, BATCH, rank, world), strict=True):
                assert torch.equal(a_in, b_in) and torch.equal(a_out, b_out) and b_in.dtype == torch.int64


def test_second_build_maps_without_tokenising(corpus: DatasetDict, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    encode = ByteTokenizer.encode

    def counting(self: ByteTokenizer, text: str) -> np.ndarray:
        calls.append(1)
        return encode(self, text)

    monkeypatch.setattr(ByteTokenizer, "encode", counting)
    cfg = DataConfig(seq_len=SEQ_LEN, embedded_max_bytes=200_000, token_cache=str(tmp_path))
    first = build_batch_source(cfg, batch_size=BATCH, seed=0, corpus=corpus)
    assert len(calls) == len(corpus["train"]) + len(corpus["validation"])
    second = build_batch_source(cfg, batch_size=BATCH, seed=0, corpus=corpus)
    assert len(calls) == len(corpus["train"]) + len(corpus["validation"])  # no document encoded again
    assert torch.equal(first.train_batch(3)[0], second.train_batch(3)[0])


def test_a_new_corpus_or_tokenizer_gets_a_new_key(corpus: DatasetDict) -> None:
    other = DatasetDict(train=corpus["train"].select(range(3)), validation=corpus["validation"])
    keys = {cache_key(loaded_identity(c), t) for c, t in [(corpus, ByteTokenizer()), (corpus, WideTokenizer()),
                                                             (other, ByteTokenizer())]}
    assert len(keys) == 3


def test_truncated_file_or_missing_index_is_rebuilt(corpus: DatasetDict, tmp_path: Path) -> None:
    directory, index, _ = build_token_cache(corpus, ByteTokenizer(), tmp_path)
    key = index.key
    with open(directory / "train.bin", "r+b") as f:
        f.truncate(10)
    assert read_index(directory, key) is None
    directory, index, written = build_token_cache(corpus, ByteTokenizer(), tmp_path)
    assert written and torch.equal(map_stream(directory, index, "train").to(torch.int64),
                                   tokenize_split(corpus["train"], ByteTokenizer()))
    (directory / INDEX_NAME).unlink()  # a writer that died before its index: never trusted
    assert build_token_cache(corpus, ByteTokenizer(), tmp_path)[2]


def test_leftover_temporary_directory_is_ignored_and_removed_once_its_writer_is_dead(
        corpus: DatasetDict, tmp_path: Path) -> None:
    key = cache_key(loaded_identity(corpus), ByteTokenizer())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    killed = tmp_path / f".tmp-{key}-{_host()}-{dead}-dead"  # a writer killed mid-way on this machine
    live = tmp_path / f".tmp-{key}-{_host()}-{os.getpid()}-live"  # one still writing
    elsewhere = tmp_path / f".tmp-{key}-other_node-{dead}-far"  # another node's, on a shared filesystem
    for leftover in (killed, live, elsewhere):
        leftover.mkdir()
        (leftover / "train.bin").write_bytes(b"\x00" * 6)
    directory, _, written = build_token_cache(corpus, ByteTokenizer(), tmp_path)
    assert written and directory == tmp_path / key and read_index(directory, key) is not None
    assert not killed.exists() and live.exists() and elsewhere.exists()


def test_publish_keeps_the_first_valid_cache(corpus: DatasetDict, tmp_path: Path) -> None:
    """Rename-if-absent, without the lock: the loser's directory goes and the winner's stays valid."""
    directory, index, _ = build_token_cache(corpus, ByteTokenizer(), tmp_path / "a")
    loser = tmp_path / "loser"
    shutil.copytree(directory, loser)
    _publish(loser, directory, index.key)
    assert not loser.exists() and read_index(directory, index.key) == index


def _build_in_child(root: str, texts: list[str], queue: multiprocessing.Queue) -> None:
    corpus = DatasetDict(train=Dataset.from_dict({"text": texts[:-1]}),
                         validation=Dataset.from_dict({"text": texts[-1:]}))
    directory, _, written = build_token_cache(corpus, ByteTokenizer(), root)
    queue.put((str(directory), written))


def test_racing_writers_end_with_one_valid_cache(tmp_path: Path) -> None:
    texts = [f"document {i} " * 50 for i in range(40)]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_build_in_child, args=(str(tmp_path), texts, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len({d for d, _ in results}) == 1 and sum(written for _, written in results) == 1
    directory = Path(results[0][0])
    assert read_index(directory, directory.name) is not None
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == [directory.name]


def test_prepare_data_cli_fills_the_cache_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf"))  # not the real home
    text = tmp_path / "tiny.txt"
    text.write_text("".join(f"line {i} of a tiny corpus\n" for i in range(200)))
    args = ["--cache", str(tmp_path / "tokens"), "data=files", f"data.paths=[{text}]"]
    prepare_main(args)
    first = capsys.readouterr().out
    assert first.startswith(f"wrote {tmp_path / 'tokens'}") and "<u2" in first
    assert f"data.token_cache={tmp_path / 'tokens'}" in first
    prepare_main(args)
    assert "already there, nothing to do" in capsys.readouterr().out
    (cache,) = [p for p in (tmp_path / "tokens").iterdir() if not p.name.startswith(".")]
    index = read_index(cache, cache.name)
    assert index is not None and sum(index.tokens.values()) == text.stat().st_size + 2  # one EOD per split


def test_batch_source_accepts_a_mapped_stream_directly(tmp_path: Path) -> None:
    """A uint16 stream is windowed as is; only the windows are int64."""
    stream = torch.arange(500, dtype=torch.int64) % 257
    source = BatchSource(stream.to(torch.uint16), stream.to(torch.uint16), seq_len=8, batch_size=4, seed=0,
                         tokenizer=ByteTokenizer())
    reference = BatchSource(stream, stream, seq_len=8, batch_size=4, seed=0, tokenizer=ByteTokenizer())
    assert source.train_tokens.dtype == torch.uint16
    assert torch.equal(source.train_batch(2)[0], reference.train_batch(2)[0])


def test_prepare_data_cli_refuses_a_bad_setting_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        prepare_main(["--cache", str(tmp_path / "tokens"), "data=files", f"data.paths=[{tmp_path / 'none.txt'}]"])
    assert exit_info.value.code == 2
    assert "moe-prepare-data: invalid setting: data.paths=" in capsys.readouterr().err
    assert not (tmp_path / "tokens").exists()  # nothing written


def test_the_key_is_the_same_in_a_fresh_interpreter(corpus: DatasetDict) -> None:
    """The next start (a new process, another actor) must find the cache this one wrote."""
    code = ("from moe_trainer.config.schema import DataConfig; "
            "from moe_trainer.data import ByteTokenizer, load_corpus; "
            "from moe_trainer.data.shards import cache_key; from moe_trainer.data.sources import loaded_identity, "
            f"source_identity; cfg = DataConfig(embedded_max_bytes={CFG.embedded_max_bytes}); "
            "print(cache_key(source_identity(cfg), ByteTokenizer()), "
            "cache_key(loaded_identity(load_corpus(cfg)), ByteTokenizer()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123", "PYTHONPATH": str(REPO)})
    assert out.stdout.strip().splitlines()[-1].split() == [cache_key(source_identity(CFG), ByteTokenizer()),
                                                           cache_key(loaded_identity(corpus), ByteTokenizer())]


def test_a_start_that_finds_its_cache_never_loads_the_corpus(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = DataConfig(seq_len=SEQ_LEN, embedded_max_bytes=200_000, token_cache=str(tmp_path))
    loads = []
    real = sources.load_corpus
    monkeypatch.setattr(sources, "load_corpus", lambda *a, **k: loads.append(1) or real(*a, **k))
    first = build_batch_source(cfg, batch_size=BATCH, seed=0)
    assert loads == [1]
    second = build_batch_source(cfg, batch_size=BATCH, seed=0)
    assert loads == [1]  # mapped from the cache, no text read
    assert torch.equal(first.train_batch(2)[0], second.train_batch(2)[0])
    in_memory = build_batch_source(CFG, batch_size=BATCH, seed=0)
    assert torch.equal(in_memory.train_batch(2)[0], second.train_batch(2)[0])


def test_a_changed_file_or_split_setting_names_another_corpus(tmp_path: Path) -> None:
    text = tmp_path / "a.txt"
    text.write_text("first version of the corpus\n" * 20)
    cfg = DataConfig(paths=[str(text)])
    before = source_identity(cfg)
    assert source_identity(cfg) == before  # stable while nothing changes
    assert source_identity(DataConfig(paths=[str(text)], val_fraction=0.1)) != before
    text.write_text("second version of the corpus\n" * 20)  # same size, new content and time
    os.utime(text, ns=(text.stat().st_atime_ns, text.stat().st_mtime_ns + 1_000_000))
    assert source_identity(cfg) != before
    assert source_identity(DataConfig(hub_name="some/dataset")) is None  # known only after loading


def _flip_a_byte(path: Path) -> None:
    """Same size, other bytes: what read_index's size check cannot see."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_a_corrupted_shard_is_refused_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    overrides = ["experiment=debug", f"data.token_cache={tmp_path / 'tokens'}"]
    data_cfg = to_dataclass(compose_dict(overrides)).data
    build_batch_source(data_cfg, batch_size=BATCH, seed=0)
    directory = refuse_corrupted_cache(data_cfg, ByteTokenizer())  # intact: passes, names the directory
    assert directory is not None and directory.parent == tmp_path / "tokens"
    _flip_a_byte(directory / "train.bin")
    with pytest.raises(ConfigError, match=r"train.bin does not match its checksum") as err:
        refuse_corrupted_cache(data_cfg, ByteTokenizer())
    assert err.value.setting == "data.token_cache" and "delete that directory" in str(err.value)
    with pytest.raises(SystemExit) as exit_info:  # moe-prepare-data never calls it "already there"
        prepare_main(["--cache", str(tmp_path / "tokens"), *overrides[:1]])
    assert exit_info.value.code == 2 and "does not match its checksum" in capsys.readouterr().err
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(Path(sys.executable).parent / "moe-train"), *overrides, "logger.mode=disabled",
                           f"hydra.run.dir={run_dir}"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("moe-train: invalid setting: data.token_cache=") and proc.stderr.count("\n") == 1
    assert not run_dir.exists()  # refused by the launch gate, before Hydra wrote anything
