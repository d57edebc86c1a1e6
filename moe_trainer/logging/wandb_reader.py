"""Reads back what W&B wrote for a run, without the network and without wandb's internals.

wandb 0.31 writes no ``wandb-summary.json``/``config.yaml`` for offline runs (its Go backend only
does that when syncing), and the Python reader of the transaction log
(``wandb.sdk.internal.datastore``) no longer exists. The one complete local record of a run is
``run-<id>.wandb``: a LevelDB *log* file (``leveldb/doc/log_format.md``) whose records are
serialized ``wandb.proto.wandb_internal_pb2.Record`` protobufs. This module parses that format
itself and depends on wandb only for the protobuf schema, which is the stable part: it is the
format ``wandb sync`` reads, so old files stay readable by newer wandb versions.

File layout::

    file   := header block*
    header := ident ":W&B" (4 bytes) | magic 0xBEE1 (uint16 LE) | version 0 (uint8)   -- 7 bytes
    block  := 32 KiB (the file header counts towards the first block) of chunks, zero padded
    chunk  := crc32 (uint32 LE) | length (uint16 LE) | type (uint8) | data[length]

``type`` is FULL, or FIRST/MIDDLE.../LAST for a record split across blocks; ``crc32`` is zlib's
CRC-32 of the type byte followed by the data. A damaged chunk loses the rest of its block (as in
LevelDB), a run killed mid-write ends in a truncated chunk; both are counted, not fatal, so a
crashed or still-running training run can still be reported on.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wandb.proto.wandb_internal_pb2 import Record

STEP_METRIC = "train/step"  # the x-axis every metric of a RunLogger is plotted against

_FILE_HEADER = struct.Struct("<4sHB")
_FILE_IDENT = b":W&B"
_FILE_MAGIC = 0xBEE1
_FILE_VERSION = 0
_CHUNK_HEADER = struct.Struct("<IHB")
_BLOCK_LEN = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4
# The CRC of a chunk covers its type byte first; precompute that prefix once per type.
_TYPE_CRC = {t: zlib.crc32(bytes([t])) for t in (_FULL, _FIRST, _MIDDLE, _LAST)}


class WandbLogFormatError(ValueError):
    """The file is not a W&B transaction log (wrong header), so nothing in it can be trusted."""


@dataclass
class ScanStats:
    """What had to be skipped while scanning, so callers can flag a damaged or unfinished run."""

    corrupt_chunks: int = 0  # chunks with a bad checksum, length or type (rest of block dropped)
    bad_records: int = 0  # reassembled records protobuf could not parse
    truncated: bool = False  # file ends inside a chunk: the writer was killed or is still writing


@dataclass
class OfflineRun:
    """One W&B run as read back from disk: identity, config, per-step history and final summary."""

    path: Path  # the run directory (``.../wandb/offline-run-<time>-<id>``)
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""  # display name
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    notes: str = ""
    start_time: float | None = None  # seconds since the epoch
    config: dict[str, Any] = field(default_factory=dict)  # without wandb's private ``_wandb`` key
    # One dict per ``log`` call, in order. Besides the logged metrics each row holds wandb's
    # ``_step`` (call counter), ``_timestamp`` and ``_runtime``; nested dicts stay nested.
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    system: list[dict[str, Any]] = field(default_factory=list)  # system-metric samples (GPU, CPU)
    metric_step: dict[str, str] = field(default_factory=dict)  # metric name or glob -> its x-axis
    alerts: list[dict[str, str]] = field(default_factory=list)  # ``run.alert`` calls: title, text, level
    exit_code: int | None = None  # None: the run never finished (crash, kill, still running)
    stats: ScanStats = field(default_factory=ScanStats)
    source: str = "transaction_log"  # or "files" when only files/*.json|yaml could be read

    @property
    def finished(self) -> bool:
        """Whether wandb recorded the end of the run (``finish`` ran)."""
        return self.exit_code is not None

    def metric_keys(self) -> list[str]:
        """Sorted user metric names seen in the history, without wandb's ``_``-prefixed ones."""
        keys = {k for row in self.history for k in row if not k.startswith("_")}
        return sorted(keys)

    def series(self, key: str, step_key: str = STEP_METRIC) -> list[tuple[Any, Any]]:
        """``(step, value)`` for every row that logged ``key``, in logging order.

        Rows without ``step_key`` fall back to wandb's ``_step`` so runs not written by
        RunLogger still yield a usable x-axis.
        """
        return [(row.get(step_key, row.get("_step")), row[key]) for row in self.history if key in row]

    def rows_by_step(self, step_key: str = STEP_METRIC) -> dict[Any, dict[str, Any]]:
        """History merged per step: several ``log`` calls at one step (train + eval) become one row.

        A later value of the same key at the same step wins, as it would on a W&B chart.
        """
        merged: dict[Any, dict[str, Any]] = {}
        for row in self.history:
            step = row.get(step_key, row.get("_step"))
            merged.setdefault(step, {}).update(row)
        return merged


def iter_records(path: Path, stats: ScanStats | None = None) -> Iterator[Record]:
    """Yields the protobuf records of a ``run-*.wandb`` file in write order.

    Raises WandbLogFormatError for a file that does not start with the W&B header; damage
    further in is recorded in ``stats`` and skipped.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto.wandb_internal_pb2 import Record  # the schema only; imports wandb (~0.4 s)

    stats = stats if stats is not None else ScanStats()
    for payload in _iter_payloads(Path(path).read_bytes(), stats):
        record = Record()
        try:
            record.ParseFromString(payload)
        except DecodeError:
            stats.bad_records += 1
            continue
        yield record


def _check_file_header(data: bytes) -> None:
    if len(data) < _FILE_HEADER.size:
        raise WandbLogFormatError(f"too short for a W&B transaction log ({len(data)} bytes)")
    ident, magic, version = _FILE_HEADER.unpack_from(data, 0)
    if ident != _FILE_IDENT or magic != _FILE_MAGIC or version != _FILE_VERSION:
        raise WandbLogFormatError(f"not a W&B transaction log (header {data[:7]!r})")


def _iter_payloads(data: bytes, stats: ScanStats, from_block_start: bool = False) -> Iterator[bytes]:
    """Reassembles the chunk stream into record payloads (the LevelDB log reader, in Python).

    ``from_block_start``: ``data`` is the file from some block boundary on, not from offset 0
    (used to look at the tail only); leading fragments of a record begun earlier are skipped.
    """
    if from_block_start:
        pos = 0
    else:
        _check_file_header(data)
        pos = _FILE_HEADER.size
    parts: list[bytes] | None = None  # fragments of a record split across blocks
    while pos < len(data):
        left_in_block = _BLOCK_LEN - pos % _BLOCK_LEN
        if left_in_block < _CHUNK_HEADER.size:  # block trailer: zero padding
            pos += left_in_block
            continue
        if len(data) - pos < _CHUNK_HEADER.size:
            stats.truncated = not _all_zero(data[pos:])
            return
        crc, length, ctype = _CHUNK_HEADER.unpack_from(data, pos)
        start = pos + _CHUNK_HEADER.size
        end = start + length
        if ctype == 0 and length == 0 and crc == 0:  # preallocated zeros: skip the block
            pos += left_in_block
            continue
        if end > len(data):
            stats.truncated = True
            return
        chunk = data[start:end]
        if (
            ctype not in _TYPE_CRC
            or length > left_in_block - _CHUNK_HEADER.size
            or zlib.crc32(chunk, _TYPE_CRC[ctype]) != crc
        ):
            stats.corrupt_chunks += 1
            parts = None
            pos += left_in_block  # resynchronise at the next block, as LevelDB does
            continue
        pos = end
        if ctype == _FULL:
            if parts is not None:
                stats.corrupt_chunks += 1  # an unfinished split record was abandoned
            parts = None
            yield chunk
        elif ctype == _FIRST:
            if parts is not None:
                stats.corrupt_chunks += 1
            parts = [chunk]
        elif parts is None:  # MIDDLE/LAST without a FIRST: its start was lost
            stats.corrupt_chunks += 1
        elif ctype == _MIDDLE:
            parts.append(chunk)
        else:  # _LAST
            parts.append(chunk)
            yield b"".join(parts)
            parts = None
    if parts is not None:
        stats.truncated = True


def transaction_log_finished(log_file: Path) -> bool:
    """Whether the run's exit record is on disk yet, reading only the last two blocks.

    wandb-core buffers the log a 32 KiB block at a time and writes the tail when the run's
    stream closes, which happens *after* ``run.finish()`` has returned; RunLogger.finish polls
    this so that a run can be read back as soon as finish returns. The exit record is small,
    so it always sits in a FULL chunk near the end.
    """
    from wandb.proto.wandb_internal_pb2 import Record

    try:
        with open(log_file, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, (size - 1) // _BLOCK_LEN - 1) * _BLOCK_LEN
            fh.seek(start)
            data = fh.read()
    except OSError:
        return False
    stats = ScanStats()
    try:
        for payload in _iter_payloads(data, stats, from_block_start=start > 0):
            record = Record()
            record.ParseFromString(payload)
            if record.WhichOneof("record_type") == "exit":
                return True
    except Exception:  # a header or protobuf error: not (yet) a complete log
        return False
    return False


def _all_zero(data: bytes) -> bool:
    return not data.strip(b"\0")


def _decode(value_json: str) -> Any:
    """Values are stored as JSON text; wandb writes NaN/Infinity the way Python's json reads them."""
    try:
        return json.loads(value_json)
    except ValueError:
        return value_json


def _item_path(item: Any) -> list[str]:
    """wandb stores a flat key in ``key`` or, for values it may nest, the path in ``nested_key``."""
    return list(item.nested_key) if len(item.nested_key) else [item.key]


def _set_path(target: dict[str, Any], path: list[str], value: Any) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            child = target[key] = {}
        target = child
    target[path[-1]] = value


def _del_path(target: dict[str, Any], path: list[str]) -> None:
    for key in path[:-1]:
        child = target.get(key)
        if not isinstance(child, dict):
            return
        target = child
    target.pop(path[-1], None)


def _apply_run(run: OfflineRun, rec: Any) -> None:
    """Applies a RunRecord; a later one (a rename, new tags) overrides the fields it sets."""
    for attr, value in (
        ("run_id", rec.run_id),
        ("project", rec.project),
        ("entity", rec.entity),
        ("name", rec.display_name),
        ("group", rec.run_group),
        ("job_type", rec.job_type),
        ("notes", rec.notes),
    ):
        if value:
            setattr(run, attr, value)
    if len(rec.tags):
        run.tags = list(rec.tags)
    if rec.HasField("start_time"):
        run.start_time = rec.start_time.seconds + rec.start_time.nanos / 1e9
    _apply_config(run, rec.config)
    _apply_summary(run, rec.summary)


def _apply_config(run: OfflineRun, rec: Any) -> None:
    for item in rec.update:
        _set_path(run.config, _item_path(item), _decode(item.value_json))
    for item in rec.remove:
        _del_path(run.config, _item_path(item))


def _apply_summary(run: OfflineRun, rec: Any) -> None:
    for item in rec.update:
        _set_path(run.summary, _item_path(item), _decode(item.value_json))
    for item in rec.remove:
        _del_path(run.summary, _item_path(item))


def _history_row(rec: Any) -> dict[str, Any]:
    row: dict[str, Any] = {}
    for item in rec.item:
        _set_path(row, _item_path(item), _decode(item.value_json))
    if "_step" not in row and rec.HasField("step"):
        row["_step"] = rec.step.num
    return row


def _stats_row(rec: Any) -> dict[str, Any]:
    row: dict[str, Any] = {item.key: _decode(item.value_json) for item in rec.item}
    if rec.HasField("timestamp"):
        row["_timestamp"] = rec.timestamp.seconds + rec.timestamp.nanos / 1e9
    return row


def _transaction_log(run_dir: Path) -> Path | None:
    logs = sorted(run_dir.glob("run-*.wandb"), key=lambda p: p.stat().st_mtime)
    return logs[-1] if logs else None


def _is_run_dir(path: Path, include_online: bool) -> bool:
    prefixes = ("offline-run-", "run-") if include_online else ("offline-run-",)
    return path.name.startswith(prefixes) and _transaction_log(path) is not None


def find_offline_runs(root: Path, include_online: bool = False) -> list[Path]:
    """Run directories (``offline-run-*`` holding a ``run-*.wandb``) under ``root``, oldest first.

    wandb names them ``offline-run-YYYYMMDD_HHMMSS-<id>``, so sorting by name is chronological
    across Hydra run dirs. ``latest-run`` symlinks are not followed, so no run is listed twice.
    ``include_online`` also lists online runs (``run-*``), whose transaction log is the same format.
    """
    root = Path(root)
    if root.is_dir() and not root.is_symlink() and _is_run_dir(root, include_online):
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for name in dirnames:
            child = here / name
            if child.is_symlink():
                continue
            if _is_run_dir(child, include_online):
                found.append(child)
            else:
                keep.append(name)
        dirnames[:] = keep  # don't descend into run dirs (files/, logs/, tmp/)
    return sorted(found, key=lambda p: (p.name, str(p)))


def _resolve_run(path: Path) -> tuple[Path, Path | None]:
    """Maps a ``.wandb`` file, a run dir, or a dir holding exactly one run to (run dir, log file)."""
    path = Path(path)
    if path.is_file():
        return path.parent, path
    if not path.is_dir():
        raise FileNotFoundError(f"no such W&B run: {path}")
    if path.name.startswith(("offline-run-", "run-")):
        return path, _transaction_log(path)
    # A failed online init leaves a stub ``run-*`` dir next to the offline fallback; prefer offline.
    runs = find_offline_runs(path) or find_offline_runs(path, include_online=True)
    if not runs:
        raise FileNotFoundError(f"no W&B run under {path}")
    if len(runs) > 1:
        listing = ", ".join(str(r) for r in runs)
        raise ValueError(f"{len(runs)} W&B runs under {path}; pass one of: {listing}")
    return runs[0], _transaction_log(runs[0])


def read_offline_run(path: Path) -> OfflineRun:
    """Reads one run back: ``path`` is its ``.wandb`` file, its run dir, or a dir holding one run.

    The transaction log gives everything (identity, config, every history row, summary, exit);
    if a run dir has none, ``files/config.yaml`` and ``files/wandb-summary.json`` are used, which
    gives no history.
    """
    run_dir, log_file = _resolve_run(path)
    run = OfflineRun(path=run_dir)
    if log_file is None:
        return _read_files(run)

    for record in iter_records(log_file, run.stats):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            run.history.append(_history_row(record.history))
        elif kind == "summary":
            _apply_summary(run, record.summary)
        elif kind == "config":
            _apply_config(run, record.config)
        elif kind == "run":
            _apply_run(run, record.run)
        elif kind == "stats":
            run.system.append(_stats_row(record.stats))
        elif kind == "metric":
            metric = record.metric
            if metric.step_metric:
                run.metric_step[metric.name or metric.glob_name] = metric.step_metric
        elif kind == "alert":
            run.alerts.append({"title": record.alert.title, "text": record.alert.text, "level": record.alert.level})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run


def _read_files(run: OfflineRun) -> OfflineRun:
    """Fallback for run dirs without a transaction log (e.g. copied ``files/`` of a synced run)."""
    run.source = "files"
    files = run.path / "files"
    summary_file = files / "wandb-summary.json"
    if summary_file.is_file():
        run.summary = json.loads(summary_file.read_text())
    config_file = files / "config.yaml"
    if config_file.is_file():
        import yaml

        raw = yaml.safe_load(config_file.read_text()) or {}
        # config.yaml wraps every entry as {desc: ..., value: ...}.
        run.config = {
            k: v.get("value") if isinstance(v, dict) and "value" in v else v
            for k, v in raw.items()
            if k not in ("_wandb", "wandb_version")
        }
    if not summary_file.is_file() and not config_file.is_file():
        raise FileNotFoundError(f"no run-*.wandb and no files/ summary or config in {run.path}")
    return run
