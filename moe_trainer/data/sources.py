"""Text sources: where the documents come from, all returned as Hugging Face `datasets` objects.

Three sources, picked by `DataConfig`:

* ``data.paths`` set: local text/json/parquet files (globs and directories expanded by
  :mod:`moe_trainer.data.paths`) through ``datasets.load_dataset``.
* ``data.hub_name`` set: a Hub dataset through ``datasets.load_dataset`` (needs network, or the
  dataset already in the local cache).
* neither: an embedded corpus made of the running interpreter's standard-library ``.py`` files.
  Every machine that runs Python has them, so a fresh checkout trains on real text with no
  download, offline, and the result is the same on every run with the same interpreter.

Whatever the source, :func:`load_corpus` returns a ``DatasetDict`` with ``train`` and
``validation`` splits holding a single ``text`` column, split by document so that validation
text is never seen in training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sys
import sysconfig
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import huggingface_hub.constants
import pyarrow as pa
from datasets import Dataset, DatasetDict

from moe_trainer.config.errors import ConfigError, first_line
from moe_trainer.data.paths import expand_data_paths, resolve_format

if TYPE_CHECKING:
    from moe_trainer.config.schema import DataConfig

TEXT_COLUMN = "text"  # the one column every split returned here has
SPLIT_SEED = 0  # fixed, so runs with different train seeds are evaluated on the same documents

# Directories of the standard library left out of the embedded corpus: test suites (huge,
# repetitive, full of deliberately odd code), the IDLE GUI, and anything installed by pip.
EMBEDDED_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "venv",
    }
)
# Local files at least this large take seconds to read into Arrow on a small machine: their
# loading keeps ``datasets``' progress bars; smaller ones load silently (see progress_bars).
LONG_PREPARATION_BYTES = 100_000_000
HUB_PROBE_TIMEOUT_S = 3.0  # how long to wait for a TCP connection to the Hub before calling it unreachable


# ----------------------------------------------------------------------------- embedded corpus


def stdlib_source_files() -> list[Path]:
    """Returns the interpreter's standard-library ``.py`` files, sorted by relative path.

    Sorting makes the selection (and so the corpus) identical on every run; the skipped
    directories are in `EMBEDDED_SKIP_DIRS`.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EMBEDDED_SKIP_DIRS and not d.startswith("config-")]
        found.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_capped(path: Path, budget: int) -> tuple[str, int]:
    """Returns (text, n_bytes) of the file, cut at the last line break within `budget` bytes if longer."""
    raw = path.read_bytes()
    if len(raw) > budget:
        cut = raw.rfind(b"\n", 0, budget)
        raw = raw[: cut + 1 if cut >= 0 else budget]
        return raw.decode("utf-8", errors="replace"), budget  # the cap is reached: nothing more fits
    return raw.decode("utf-8", errors="replace"), len(raw)


def embedded_corpus(max_bytes: int) -> Dataset:
    """Returns standard-library sources as an in-memory ``Dataset`` of one document per file.

    Files are taken whole in sorted order until `max_bytes` would be exceeded; the file that
    crosses the cap is cut at a line break so the total is at most `max_bytes`. The dataset lives
    in memory (``Dataset.from_dict``), so nothing is written to the HF cache.
    """
    if max_bytes <= 0:
        raise ConfigError("data.embedded_max_bytes", max_bytes, "must be positive (e.g. 4000000)")
    texts: list[str] = []
    budget = max_bytes
    for path in stdlib_source_files():
        if budget <= 0:
            break
        text, used = _read_capped(path, budget)
        if text.strip():
            texts.append(text)
        budget -= used
    if not texts:
        raise ConfigError("data.embedded_max_bytes", max_bytes, "too small to hold any source line; raise it")
    return Dataset.from_dict({TEXT_COLUMN: texts})


# ----------------------------------------------------------------------------- local files


def load_local(paths: list[str], fmt: str, text_field: str, cache_dir: str | None = None) -> Dataset:
    """Returns the documents of local files as a ``Dataset`` with a ``text`` column.

    Plain-text files are read with ``sample_by="document"``: one file is one document, keeping
    its line breaks (the ``text`` builder's default of one row per line would put an
    end-of-document token at every line end). json/parquet rows are documents, read from the
    `text_field` column.
    """
    files = expand_data_paths(paths)
    builder = resolve_format(files, fmt)
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    with progress_bars(sum(os.path.getsize(f) for f in files) >= LONG_PREPARATION_BYTES):
        try:
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        except (datasets.exceptions.DatasetsError, pa.ArrowException, ValueError, OSError) as err:
            problem = f"could not be read as {builder}: {first_line(err, with_type=True)}"
            raise ConfigError("data.paths", paths, problem) from err
        field = TEXT_COLUMN if builder == "text" else text_field
        return select_text(ds, field, origin=f"{builder} files {files}")


@contextlib.contextmanager
def progress_bars(show: bool) -> Iterator[None]:
    """Turns ``datasets``' progress bars off for a while unless ``show``.

    Each process that loads data (the driver of ``single``, every Ray actor) would draw its
    own "Generating train split" and "Filter" bars for a load that takes a fraction of a
    second; only a long preparation deserves them. Bars the user turned off
    (``HF_DATASETS_DISABLE_PROGRESS_BARS``) stay off.
    """
    was_disabled = datasets.utils.are_progress_bars_disabled()
    if not show and not was_disabled:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not show and not was_disabled:
            datasets.utils.enable_progress_bars()


# ----------------------------------------------------------------------------- hub


def _hub_address() -> tuple[str, int]:
    """Returns the (host, port) a Hub request first connects to: the HTTPS proxy if one is set."""
    endpoint = urllib.parse.urlsplit(huggingface_hub.constants.ENDPOINT)
    proxy = urllib.request.getproxies().get("https")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        return parts.hostname or "", parts.port or 80
    return endpoint.hostname or "", endpoint.port or (443 if endpoint.scheme == "https" else 80)


def hub_reachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """Returns whether a TCP connection to the Hub (or its proxy) opens within `timeout` seconds.

    ``huggingface_hub`` retries a failed request 5 times with backoff (~25 s per file, not
    configurable), so an unreachable Hub would stall a run for minutes. This probe runs in a
    daemon thread because DNS lookups ignore socket timeouts and can hang.
    """
    host, port = _hub_address()
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True, name="hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def hub_offline() -> bool:
    """Returns whether the user turned Hub access off (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return bool(datasets.config.HF_HUB_OFFLINE or huggingface_hub.constants.is_offline_mode())


@contextlib.contextmanager
def _forced_offline() -> Iterator[None]:
    """Makes ``datasets`` and ``huggingface_hub`` behave as under ``HF_HUB_OFFLINE=1`` for a while.

    Both libraries read the environment variable once at import, into these module attributes,
    and consult the attributes on each call; setting them is the only way to switch to
    cache-only loading (which fails at once on a cache miss instead of retrying) at run time.
    """
    saved = datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, huggingface_hub.constants.HF_HUB_OFFLINE = saved


def load_hub(name: str, config_name: str | None, text_field: str, cache_dir: str | None = None) -> Dataset:
    """Returns the ``train`` split of Hub dataset `name` as a ``Dataset`` with a ``text`` column.

    Offline (by setting, or because the Hub does not answer within seconds) only the local HF
    cache is used, so a dataset downloaded earlier still loads and a missing one fails at once
    with a one-line :class:`ConfigError` instead of minutes of retries.
    """
    offline_reason, fix = None, ""
    if hub_offline():
        offline_reason = "Hub access is off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"
        fix = "unset HF_HUB_OFFLINE and HF_DATASETS_OFFLINE to download it"
    elif not hub_reachable():
        offline_reason = f"the Hub ({huggingface_hub.constants.ENDPOINT}) is unreachable"
        fix = "connect to the network"
    where = f"{name}" + (f" (data.hub_config={config_name!r})" if config_name else "")
    try:
        with _forced_offline() if offline_reason else contextlib.nullcontext():
            ds = datasets.load_dataset(name, config_name, split="train", cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any failure of a Hub load is reported as this setting's error
        if offline_reason:
            problem = (
                f"{offline_reason} and {where} is not in the local HF cache; {fix}, or use local "
                f"files (data.paths) or the embedded corpus (data.paths and data.hub_name unset) "
                f"[{first_line(err, with_type=True)}]"
            )
        else:
            problem = f"could not load {where} from the Hub: {first_line(err, with_type=True)}"
        raise ConfigError("data.hub_name", name, problem) from err
    if not isinstance(ds, Dataset):
        raise ConfigError("data.hub_name", name, "loads as a streaming dataset; only map-style is supported")
    return select_text(ds, text_field, origin=f"Hub dataset {where}")


# ----------------------------------------------------------------------------- common


def select_text(ds: Dataset, field: str, origin: str) -> Dataset:
    """Returns `ds` reduced to one string column renamed ``text``, empty documents dropped.

    Missing or non-string columns are a :class:`ConfigError` naming ``data.text_field`` and the
    columns that do exist, since a wrong field name is the usual mistake with json/parquet data.
    """
    if field not in ds.column_names:
        raise ConfigError(
            "data.text_field",
            field,
            f"no such column in {origin}; its columns are {ds.column_names}; "
            "set data.text_field to one of them",
        )
    feature = ds.features[field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise ConfigError("data.text_field", field, f"column in {origin} holds {feature}, not strings")
    ds = ds.select_columns([field])
    if field != TEXT_COLUMN:
        ds = ds.rename_column(field, TEXT_COLUMN)
    # File-backed data: the kept rows' indices go to a cache file beside the Arrow data, and a
    # large corpus is read by worker processes, so this process's resident set never holds the
    # pages of all its text (a Ray actor building the token cache on a first start would).
    in_memory = not ds.cache_files
    workers = min(4, os.cpu_count() or 1) if not in_memory and ds.data.nbytes >= LONG_PREPARATION_BYTES else 1
    return ds.filter(_non_empty, batched=True, input_columns=TEXT_COLUMN, keep_in_memory=in_memory,
                     num_proc=workers if workers > 1 else None)


def _non_empty(texts: list[str | None]) -> list[bool]:
    """Batched filter: keeps documents with at least one non-whitespace character."""
    return [bool(t and t.strip()) for t in texts]


def _split_one_document(text: str, val_fraction: float) -> DatasetDict:
    """Splits a single document's text into train (head) and validation (tail).

    With one document there is nothing to split by document, so the last `val_fraction` of its
    characters, moved forward to the next line break when there is one, becomes validation.
    """
    cut = min(max(int(len(text) * (1.0 - val_fraction)), 1), len(text) - 1)
    newline = text.find("\n", cut, len(text) - 1)
    cut = newline + 1 if newline >= 0 else cut
    return DatasetDict(
        train=Dataset.from_dict({TEXT_COLUMN: [text[:cut]]}),
        validation=Dataset.from_dict({TEXT_COLUMN: [text[cut:]]}),
    )


def split_documents(ds: Dataset, val_fraction: float, seed: int = SPLIT_SEED) -> DatasetDict:
    """Holds out a seeded random `val_fraction` of the documents (at least one, never all).

    Returns a ``DatasetDict`` with ``train`` and ``validation``. A single document is split by
    text instead (see :func:`_split_one_document`).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError("data.val_fraction", val_fraction, "must lie strictly between 0 and 1 (e.g. 0.05)")
    n = len(ds)
    if n == 0:
        raise ConfigError("data", "no documents", "the corpus has no non-empty document; check data.paths")
    if n == 1:
        return _split_one_document(ds[0][TEXT_COLUMN], val_fraction)
    n_val = min(max(round(n * val_fraction), 1), n - 1)
    # No keep_in_memory here: datasets 5.2.0 raises ValueError when it is combined with a
    # file-backed dataset (it also passes its own indices cache file name). File-backed data get
    # small index files next to their Arrow cache; in-memory data stay in memory.
    parts = ds.train_test_split(test_size=n_val, seed=seed)
    return DatasetDict(train=parts["train"], validation=parts["test"])


def load_documents(data_cfg: DataConfig, cache_dir: str | None = None) -> Dataset:
    """Returns all documents of the source `data_cfg` selects, before the train/validation split."""
    if data_cfg.paths and data_cfg.hub_name:
        problem = "set either data.paths or data.hub_name, not both"
        raise ConfigError("data.hub_name", data_cfg.hub_name, problem)
    if data_cfg.paths:
        return load_local(list(data_cfg.paths), data_cfg.format, data_cfg.text_field, cache_dir)
    if data_cfg.hub_name:
        return load_hub(data_cfg.hub_name, data_cfg.hub_config, data_cfg.text_field, cache_dir)
    return embedded_corpus(data_cfg.embedded_max_bytes)


@dataclass(frozen=True)
class CorpusSource:
    """A corpus named without reading it, and how to load it.

    The token cache is looked up by `identity`, so a start that finds its cache never loads
    (or filters, or splits) the text at all: on a 500 MB corpus that is the difference between
    mapping two files and reading every byte of text into each actor. ``identity`` None means
    the corpus can be named only once loaded (a Hub dataset: its ``datasets`` fingerprints).
    """

    identity: str | None
    load: Callable[[], DatasetDict]
    # data.streaming: batches of (held out, text) read from an IterableDataset; the cache is written
    # from these instead of from `load` (which a streamed source never calls)
    documents: Callable[[], Iterator[list[tuple[bool, str]]]] | None = None

    @classmethod
    def of(cls, corpus: DatasetDict) -> CorpusSource:
        """A corpus already in hand, named by its splits' ``datasets`` fingerprints."""
        return cls(loaded_identity(corpus), lambda: corpus)


def loaded_identity(corpus: DatasetDict) -> str:
    """The name of a loaded corpus: its train and validation ``datasets`` fingerprints."""
    return json.dumps({split: corpus[split]._fingerprint for split in ("train", "validation")}, sort_keys=True)


def _files_identity(files: list[str | Path]) -> list[tuple[str, int, int]]:
    """Each file's real path, size and modification time: a changed file makes a new identity."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append((os.path.realpath(f), st.st_size, st.st_mtime_ns))
    return out


def source_identity(data_cfg: DataConfig, split_seed: int = SPLIT_SEED) -> str | None:
    """Names the corpus `data_cfg` selects from settings and file metadata alone, without reading text.

    Local files: their paths, sizes and modification times, format and text field; the embedded
    corpus: this interpreter's standard-library files the same way, and the size cap. Both add
    the train/validation split settings. A Hub dataset returns None (its content is known only
    through ``datasets``' own fingerprint, after loading).
    """
    split = {"val_fraction": data_cfg.val_fraction, "split_seed": split_seed, "streaming": data_cfg.streaming}
    if data_cfg.hub_name:
        if not data_cfg.streaming:
            return None
        described = {"kind": "hub", "name": data_cfg.hub_name, "config": data_cfg.hub_config,
                     "text_field": data_cfg.text_field, **split}  # a stream has no fingerprint: its name
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()
    if data_cfg.paths:
        files = expand_data_paths(list(data_cfg.paths))
        described = {"kind": "files", "files": _files_identity(files), "format": resolve_format(files, data_cfg.format),
                     "text_field": data_cfg.text_field, **split}
    else:
        described = {"kind": "embedded", "python": sys.version, "stdlib": _files_identity(stdlib_source_files()),
                     "max_bytes": data_cfg.embedded_max_bytes, **split}
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def corpus_source(data_cfg: DataConfig, *, split_seed: int = SPLIT_SEED, cache_dir: str | None = None
                  ) -> CorpusSource:
    """The corpus `data_cfg` selects, named (:func:`source_identity`) and loadable (:func:`load_corpus`),
    or with ``data.streaming`` readable as a stream (:mod:`moe_trainer.data.streaming`)."""
    identity = source_identity(data_cfg, split_seed)
    if data_cfg.streaming:
        from moe_trainer.data.streaming import stream_documents

        def never() -> DatasetDict:
            raise RuntimeError("a streamed corpus is only read into the token cache (data.streaming=true)")

        return CorpusSource(identity, never, lambda: stream_documents(data_cfg, split_seed))
    return CorpusSource(identity, lambda: load_corpus(data_cfg, split_seed=split_seed, cache_dir=cache_dir))


def load_corpus(
    data_cfg: DataConfig, *, split_seed: int = SPLIT_SEED, cache_dir: str | None = None
) -> DatasetDict:
    """Returns the corpus as ``DatasetDict(train=..., validation=...)``, each with a ``text`` column.

    The split uses `split_seed`, not the training seed, so that runs differing only in seed are
    scored on the same validation documents. `cache_dir` overrides the HF datasets cache used
    for local and Hub files (the embedded corpus never touches it).
    """
    return split_documents(load_documents(data_cfg, cache_dir), data_cfg.val_fraction, split_seed)
