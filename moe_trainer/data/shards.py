"""Token shards on disk: each split tokenised once, stored flat, read a window at a time by every rank.

Tokenising in memory costs 8 bytes per token in every actor and is redone at every start. The
cache written here holds, per split, one flat file of the exact stream ``tokenize_split`` makes
(documents in order, each followed by the tokenizer's end-of-document id) as raw little-endian
``uint16`` (vocabularies up to 65536 ids) or ``uint32``, plus ``index.json`` (dtype, token
counts, tokenizer and its sha256, source fingerprint, format version) and, for a tokenizer read
from a file, that ``tokenizer.json``. Readers ``pread`` windows (:class:`TokenFile`): the OS
page cache holds the files once for all actors of a machine, and a process holds only the
windows of its batch.

Layout: ``<token_cache>/<key>/{train.bin, validation.bin, index.json[, tokenizer.json]}``, where
``key`` hashes the corpus's identity (:class:`~moe_trainer.data.sources.CorpusSource`: its files'
paths, sizes and modification times and the split settings, known without reading any text; a
Hub dataset's ``datasets`` fingerprints), the tokenizer's name, vocabulary size and (for a
tokenizer.json) the sha256 of its bytes, and :data:`FORMAT_VERSION`, so a changed corpus, split
or tokenizer lands in a new directory, and a start that finds its directory reads it without
loading the corpus. ``data.token_cache`` names the root; a shard directory given in its place is
refused with what it holds (:func:`refuse_shard_directory`).

Writes are atomic: everything is built in a hidden temporary directory and renamed into place
(a directory rename onto an existing non-empty one fails, so the first writer wins). Concurrent
writers of one key (several Ray actors starting at once) also take a per-key ``flock`` so that
one tokenises while the others wait and then map its result. A reader trusts a directory only
when its index names this key and format and every file has the size the index promises, so a
leftover temporary directory or a truncated file is never read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, DatasetDict, Features, Sequence, Value
from tqdm.auto import tqdm

from moe_trainer.checksums import file_sha256
from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import DataConfig
from moe_trainer.data.sources import (
    LONG_PREPARATION_BYTES,
    TEXT_COLUMN,
    CorpusSource,
    loaded_identity,
    progress_bars,
    source_identity,
)
from moe_trainer.data.tokenizer import Tokenizer, describe
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer

FORMAT_VERSION = 3  # bump when the file layout or the stream's definition changes
SPLITS = ("train", "validation")
INDEX_NAME = "index.json"
IDS_COLUMN = "ids"
SMALL_TEXT_BYTES = 1_000_000  # below this, worker start-up costs more than tokenising in one process


@dataclass(frozen=True)
class ShardIndex:
    """What ``index.json`` records about one cache directory."""

    format_version: int
    key: str
    dtype: str  # numpy dtype string, little-endian: "<u2" or "<u4"
    tokens: dict[str, int]  # split -> token count
    tokenizer: str
    vocab_size: int
    source: str  # the corpus's identity (CorpusSource.identity, or its datasets fingerprints)
    tokenizer_sha256: str | None = None  # sha256 of the tokenizer.json (saved beside); None: byte tokenizer
    sha256: dict[str, str] | None = None  # split -> sha256 of its .bin file, checked before a run starts


def token_dtype(vocab_size: int) -> np.dtype:
    """Returns the smallest stored dtype for ids in [0, vocab_size): uint16 up to 65536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def cache_key(source: str, tokenizer: Tokenizer) -> str:
    """Returns the cache directory name for corpus `source` (an identity) tokenised by `tokenizer` (16 hex digits)."""
    parts = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "tokenizer": tokenizer.name,
        "vocab_size": tokenizer.vocab_size,
    }
    if tokenizer.digest is not None:  # a tokenizer read from a file: its exact bytes
        parts["tokenizer_sha256"] = tokenizer.digest
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _parse_index(directory: Path) -> ShardIndex | None:
    """``directory``'s ``index.json``, or None when there is none or it is not an index of this format."""
    try:
        return ShardIndex(**json.loads((directory / INDEX_NAME).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def refuse_shard_directory(root: Path, tokenizer: Tokenizer | None) -> None:
    """Raises a ConfigError naming ``data.token_cache`` when `root` is one cache directory, not the root.

    Pointing ``data.token_cache`` at ``<root>/<key>`` would otherwise grow a cache inside a cache
    (or, read as one, feed ids of another tokenizer to this model). The message says which
    tokenizer made it and, when `tokenizer` is known, whether that is this run's.
    """
    index = _parse_index(root.expanduser())
    if index is None:
        return  # no index there: a root (or not a cache at all)
    theirs = describe(index.tokenizer, index.vocab_size, index.tokenizer_sha256)
    made = f"holds token shards made with tokenizer {theirs}"
    if tokenizer is not None and (tokenizer.name, tokenizer.digest) != (index.tokenizer, index.tokenizer_sha256):
        made += f", not this run's tokenizer {describe(tokenizer.name, tokenizer.vocab_size, tokenizer.digest)}"
    raise ConfigError("data.token_cache", str(root), f"{made}; data.token_cache is the cache root, in which "
                      "every corpus and tokenizer gets its own directory: use data.token_cache="
                      f"{root.expanduser().parent}")


def default_num_proc() -> int:
    """Tokeniser processes when ``data.tokenize_procs`` is 0: up to 4, never more than the cores."""
    return min(4, os.cpu_count() or 1)


def read_index(directory: Path, key: str) -> ShardIndex | None:
    """Returns the index of `directory` when it is a complete cache for `key`, else None.

    Complete means: the index parses, names this key and format version, and every split's file
    is exactly ``tokens * itemsize`` bytes long. Anything else (no index yet, a truncated file,
    an older format) is not trusted.
    """
    index = _parse_index(directory)
    if index is None:
        return None
    if index.format_version != FORMAT_VERSION or index.key != key or set(index.tokens) != set(SPLITS):
        return None
    itemsize = np.dtype(index.dtype).itemsize
    for split, count in index.tokens.items():
        try:
            if (directory / f"{split}.bin").stat().st_size != count * itemsize:
                return None
        except OSError:
            return None
    return index


def cache_problems(directory: Path, index: ShardIndex) -> list[str]:
    """What is wrong with a complete cache's files: each split whose bytes do not match the index's sha256.

    :func:`read_index` sees a truncated or missing file (and the cache is rebuilt); a file of the
    right size with other bytes (a disk error, a copy gone wrong, an edit) only shows here.
    """
    return [f"{split}.bin does not match its checksum (corrupted or altered)"
            for split, want in (index.sha256 or {}).items() if file_sha256(directory / f"{split}.bin") != want]


_VERIFIED: set[tuple[object, ...]] = set()  # caches this process checked: (directory, (size, mtime) per file)


def refuse_corrupted_cache(data_cfg: DataConfig, tokenizer: Tokenizer) -> Path | None:
    """Before any actor starts: checks the cache this run will map, if it exists; returns its directory.

    Raises :class:`ConfigError` naming ``data.token_cache`` when its files do not match their
    checksums, with the fix (delete it: the next start rebuilds it). A Hub corpus is named only
    after loading, so its cache is checked by the actors' lookup alone (sizes).
    """
    identity = source_identity(data_cfg) if data_cfg.token_cache else None
    if identity is None:
        return None
    directory = Path(data_cfg.token_cache).expanduser() / cache_key(identity, tokenizer)
    index = read_index(directory, directory.name)
    if index is None:
        return None  # not built yet (or incomplete): the first actor builds it
    stamp = (str(directory), *((f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(directory.glob("*.bin"))))
    if stamp in _VERIFIED:  # the launch gate and the run are one process: hash once
        return directory
    problems = cache_problems(directory, index)
    if problems:
        raise ConfigError("data.token_cache", str(data_cfg.token_cache),
                          f"token shards {directory} are damaged: {'; '.join(problems)}; delete that directory "
                          "and start again: the next start (or moe-prepare-data) tokenises the corpus anew")
    _VERIFIED.add(stamp)
    return directory


class _Encode:
    """Batched ``Dataset.map`` function: each document's ids followed by the EOD id, in `dtype`.

    A class rather than a closure so worker processes can pickle it.
    """

    def __init__(self, tokenizer: Tokenizer, dtype: np.dtype) -> None:
        self.tokenizer, self.dtype = tokenizer, dtype

    def __call__(self, texts: list[str]) -> dict[str, list[np.ndarray]]:
        eod = self.tokenizer.eod_id
        return {IDS_COLUMN: [np.append(ids, eod).astype(self.dtype) for ids in self.tokenizer.encode_batch(texts)]}


def _write_split(ds: Dataset, tokenizer: Tokenizer, dtype: np.dtype, out: Path, work: Path,
                 num_proc: int, key: str) -> tuple[int, str]:
    """Tokenises `ds` into the flat file `out`; returns its token count and the file's sha256.

    The ``map`` result goes to Arrow files in `work` (inside the temporary directory, removed
    before the rename), never into the HF cache and never whole into memory.
    """
    text_bytes = ds.data.nbytes
    procs = 1 if text_bytes < SMALL_TEXT_BYTES or len(ds) < 2 else max(1, min(num_proc, len(ds)))
    features = Features({IDS_COLUMN: Sequence(Value(dtype.name))})
    with progress_bars(text_bytes >= LONG_PREPARATION_BYTES):
        tokens = ds.select_columns([TEXT_COLUMN]).map(
            _Encode(tokenizer, dtype), batched=True, input_columns=TEXT_COLUMN, remove_columns=[TEXT_COLUMN],
            # None, not 1: datasets 5 starts a worker pool for any num_proc >= 1
            features=features, num_proc=procs if procs > 1 else None, cache_file_name=str(work / f"{out.stem}.arrow"),
            new_fingerprint=f"{key}-{out.stem}", desc=f"Tokenising {out.stem}",
        )
    files = [c["filename"] for c in tokens.cache_files]
    del tokens  # its memory map of the ids: read below batch by batch instead
    count = 0
    digest = hashlib.sha256()
    with open(out, "wb") as f:
        for flat in _id_batches(files):
            stored = np.ascontiguousarray(flat.astype(dtype, copy=False))
            stored.tofile(f)
            digest.update(memoryview(stored).cast("B"))
            count += stored.size
        f.flush()
        os.fsync(f.fileno())
    return count, digest.hexdigest()


def _write_documents(batches: Iterator[list[tuple[bool, str]]], tokenizer: Tokenizer, dtype: np.dtype,
                     tmp: Path) -> dict[str, tuple[int, str]]:
    """Tokenises streamed (held out, text) batches into ``train.bin`` / ``validation.bin`` in `tmp`.

    Returns each split's token count and sha256. The stream order is kept inside each split, as
    the map-style path keeps document order.
    """
    files = {s: open(tmp / f"{s}.bin", "wb") for s in SPLITS}  # noqa: SIM115 - closed below, after fsync
    digests = {s: hashlib.sha256() for s in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    eod = tokenizer.eod_id
    try:
        with tqdm(desc="Tokenising (streamed)", unit=" docs", disable=None) as bar:
            for batch in batches:
                for (held_out, _), ids in zip(batch, tokenizer.encode_batch([t for _, t in batch]), strict=True):
                    split = "validation" if held_out else "train"
                    stored = np.append(ids, eod).astype(dtype)
                    files[split].write(stored.tobytes())
                    digests[split].update(stored.tobytes())
                    counts[split] += stored.size
                bar.update(len(batch))
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        for f in files.values():
            f.close()
    return {s: (counts[s], digests[s].hexdigest()) for s in SPLITS}


def _id_batches(files: list[str]) -> Iterator[np.ndarray]:
    """The ids column of ``Dataset.map``'s Arrow cache files, flattened, one record batch at a time.

    Read with plain file reads, not through the dataset's memory map: a mapped page that was
    read stays in the process's resident set until the map goes, so walking 600 M tokens that
    way made the tokenising process (a Ray actor, on a first start) 1.2 GB larger; buffers of
    one batch are freed as the next is read.
    """
    for name in files:
        with pa.OSFile(name) as source:
            for batch in pa.ipc.open_stream(source):
                yield batch.column(IDS_COLUMN).flatten().to_numpy(zero_copy_only=False)


@contextlib.contextmanager
def _key_lock(root: Path, key: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` on ``<root>/.<key>.lock`` so one process tokenises a key at a time.

    Only an economy: correctness comes from the atomic rename, so a filesystem without working
    locks (some network mounts) costs duplicate work, never a bad cache.
    """
    with open(root / f".{key}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _host() -> str:
    """This machine's name as it appears in temporary directory names (no '-', which separates fields)."""
    return socket.gethostname().replace("-", "_")


def _pid_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (one owned by another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_writers(root: Path, key: str) -> None:
    """Deletes ``.tmp-<key>-<host>-<pid>-*`` directories of writers of `key` that died on this machine.

    A killed writer leaves its temporary directory behind (as large as the cache); nothing reads
    it, but nothing else would free the space. Only this host's directories whose pid is gone are
    removed, so a live writer on this machine or on another node of a shared filesystem keeps its own.
    """
    for leftover in root.glob(f".tmp-{key}-*"):
        parts = leftover.name.split("-")  # [".tmp", key, host, pid, uuid]
        if len(parts) == 5 and parts[2] == _host() and parts[3].isdigit() and not _pid_alive(int(parts[3])):
            shutil.rmtree(leftover, ignore_errors=True)


def _publish(tmp: Path, final: Path, key: str) -> None:
    """Renames `tmp` to `final` unless a valid cache got there first; an invalid one is moved aside."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if read_index(final, key) is not None:  # another writer won: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
                return
            stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex}")
            with contextlib.suppress(OSError):
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
    raise OSError(f"could not move the token cache {tmp} to {final}")


def build_token_cache(corpus: DatasetDict | CorpusSource, tokenizer: Tokenizer, root: str | os.PathLike[str],
                      num_proc: int = 0) -> tuple[Path, ShardIndex, bool]:
    """Makes sure the cache of `corpus` tokenised by `tokenizer` exists under `root`.

    A :class:`CorpusSource` with an identity is loaded only when its cache is missing, so a
    start that finds the cache reads no text. Returns (directory, index, written): ``written``
    is False when a valid cache was already there and nothing was tokenised. `num_proc` 0
    means :func:`default_num_proc`.
    """
    source = corpus if isinstance(corpus, CorpusSource) else CorpusSource.of(corpus)
    loaded = None if source.identity is not None else source.load()
    identity = source.identity if loaded is None else loaded_identity(loaded)
    root_path = Path(root).expanduser()
    refuse_shard_directory(root_path, tokenizer)
    root_path.mkdir(parents=True, exist_ok=True)
    key = cache_key(identity, tokenizer)
    final = root_path / key
    index = read_index(final, key)
    if index is not None:
        return final, index, False
    with _key_lock(root_path, key):
        index = read_index(final, key)  # written by the holder we waited for
        if index is not None:
            return final, index, False
        _remove_dead_writers(root_path, key)
        if loaded is None and source.documents is None:
            loaded = source.load()
        tmp = root_path / f".tmp-{key}-{_host()}-{os.getpid()}-{uuid.uuid4().hex}"
        work = tmp / "work"
        work.mkdir(parents=True)
        try:
            dtype = token_dtype(tokenizer.vocab_size)
            procs = num_proc or default_num_proc()
            if source.documents is not None:  # data.streaming: straight from the stream, no Arrow copy
                written = _write_documents(source.documents(), tokenizer, dtype, tmp)
            else:
                written = {s: _write_split(loaded[s], tokenizer, dtype, tmp / f"{s}.bin", work, procs, key)
                           for s in SPLITS}
            counts, digests = {s: n for s, (n, _) in written.items()}, {s: h for s, (_, h) in written.items()}
            shutil.rmtree(work)
            if isinstance(tokenizer, FileTokenizer):  # the shards' ids mean nothing without it
                tokenizer.save(tmp / TOKENIZER_FILE)
            index = ShardIndex(FORMAT_VERSION, key, dtype.str, counts, tokenizer.name, tokenizer.vocab_size,
                               identity, tokenizer.digest, digests)
            (tmp / INDEX_NAME).write_text(json.dumps(asdict(index), indent=1, sort_keys=True))
            _publish(tmp, final, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final, index, True


def map_stream(directory: Path, index: ShardIndex, split: str) -> torch.Tensor:
    """Returns `split`'s stream memory-mapped, in its stored dtype (uint16/uint32), shape [n_tokens].

    The whole stream at once, for tools and tests that compare or scan it; training reads
    windows through :class:`TokenFile` instead (a mapping's touched pages stay resident).
    Copy-on-write mapping (``mode="c"``): pages are read lazily and shared with every other
    reader, and torch gets a writable array (no read-only warning); nothing writes to it.
    """
    count = index.tokens[split]
    dtype = np.dtype(index.dtype)
    if count == 0:  # mmap refuses an empty file
        return torch.from_numpy(np.empty(0, dtype=dtype))
    return torch.from_numpy(np.memmap(directory / f"{split}.bin", dtype=dtype, mode="c", shape=(count,)))


class TokenFile:
    """A split's token file, read a window at a time with ``pread``: what training reads from the cache.

    Not through a memory map: this disk's page cache holds large folios (8 MB read-ahead here),
    and a fault on a mapped file maps a whole folio into the process, so 320 random windows of
    257 tokens added 440 MB to an actor's resident set (``MADV_RANDOM`` does not change it, the
    folios are already cached). ``pread`` copies just the window (4 us each) and the page cache
    is still shared by every actor of the machine.
    """

    def __init__(self, path: Path, dtype: np.dtype, count: int) -> None:
        self.path, self.np_dtype, self.count = path, np.dtype(dtype), count
        self.dtype = torch.from_numpy(np.empty(0, dtype=self.np_dtype)).dtype
        self._fd = os.open(path, os.O_RDONLY)

    def numel(self) -> int:
        return self.count

    def contiguous(self) -> TokenFile:
        return self

    def windows(self, starts: torch.Tensor, length: int) -> torch.Tensor:
        """The ``length`` tokens from each start, as stored: [len(starts), length]."""
        size = self.np_dtype.itemsize
        rows = [np.frombuffer(os.pread(self._fd, length * size, int(start) * size), dtype=self.np_dtype)
                for start in starts.tolist()]
        return torch.from_numpy(np.stack(rows)) if rows else torch.empty(0, length, dtype=self.dtype)

    def __getstate__(self) -> dict[str, object]:  # a file descriptor does not cross processes: reopen
        return {"path": self.path, "dtype": self.np_dtype.str, "count": self.count}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__init__(state["path"], state["dtype"], state["count"])  # type: ignore[misc,arg-type]

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):
            os.close(self._fd)


def cached_streams(corpus: DatasetDict | CorpusSource, tokenizer: Tokenizer, root: str | os.PathLike[str],
                   num_proc: int = 0) -> dict[str, TokenFile]:
    """Returns the train and validation token files of the cache (built on first use)."""
    directory, index, _ = build_token_cache(corpus, tokenizer, root, num_proc)
    return {s: TokenFile(directory / f"{s}.bin", np.dtype(index.dtype), index.tokens[s]) for s in SPLITS}

