"""Checkpoint files on disk: written and read with ``torch.distributed.checkpoint`` (DCP).

What the entries are (their canonical keys, who owns them) is
:mod:`moe_trainer.train.sharded_checkpoint`'s business; this module only moves a flat
``{key: tensor}`` to and from a directory.

- **Writing** is DCP's collective save over a process group of every rank (a gloo group
  of its own, so it can run in a background thread beside training's collectives): each
  rank writes its entries into its own ``__<rank>_0.distcp``, and the coordinator writes
  ``.metadata``, the index of every entry's file, offset and length. A rank that owns
  nothing writes an empty file. Without a process group (``single``) the one process
  writes alone.
- **Reading** is per rank, without collectives: each rank asks for the entries its layout
  needs, and DCP reads exactly their byte ranges (the other ranks' experts are never
  read), straight into the destination tensors. No collective also means one rank's
  error (an entry missing for its experts) cannot leave the others waiting.
- ``.metadata`` is read by :mod:`moe_trainer.train.safe_metadata` (never a plain unpickle),
  tensors by ``torch.load(weights_only=True)``.

Checkpoints of the earlier format (``shard_rank*.pt``, one ``torch.save`` per rank) are
still read, the old way (every shard file whole, ``weights_only``), so runs saved before
this format resume; new checkpoints are always DCP.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import Tensor
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from moe_trainer.config.errors import ConfigError
from moe_trainer.train.safe_metadata import METADATA_FILE, SafeFileSystemReader, load_metadata

LEGACY_SHARDS = "shard_rank*.pt"


# DCP warns at every call without collectives that it "assumes a single process": by design here (reads are
# per rank, ``single`` has no group). Process-wide, since a background save makes the call in its own thread.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class CheckpointWriteError(RuntimeError):
    """Writing a checkpoint's files failed (disk full, a rank lost); the checkpoint does not exist."""


def _first_failure(err: CheckpointException) -> tuple[int, BaseException]:
    """The first failed rank and its exception (DCP gathers every rank's into one ``BaseException``)."""
    rank, (cause, _trace) = next(iter(err.failures.items()))
    return rank, cause


def _one_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _write_error(directory: Path, err: CheckpointException) -> CheckpointWriteError:
    rank, cause = _first_failure(err)
    return CheckpointWriteError(f"writing checkpoint files into {directory} failed on rank {rank}: {_one_line(cause)}")


def write_state(directory: Path, state: dict[str, Tensor], group: Any | None,
                background: bool = False) -> Callable[[], None]:
    """Writes ``state`` (this rank's entries) into ``directory``; every rank of ``group`` must call it.

    Returns a function that waits until the files are written (raising :class:`CheckpointWriteError`
    if they could not be). ``background``: returns once ``state`` is copied (DCP's staging, one copy
    of this rank's entries in host memory) and writes in a thread; the caller may change the live
    tensors meanwhile. ``group`` None: this process alone.
    """
    writer = dcp.FileSystemWriter(directory, sync_files=True)
    try:
        if background:
            future = dcp.async_save(state, storage_writer=writer, process_group=group, no_dist=group is None)
        else:
            dcp.save(state, storage_writer=writer, process_group=group, no_dist=group is None)
            return lambda: None
    except CheckpointException as err:
        raise _write_error(directory, err) from err

    def wait() -> None:
        try:
            future.result()
        except CheckpointException as err:
            raise _write_error(directory, err) from err

    return wait


def is_legacy(directory: Path) -> bool:
    """A checkpoint of the format before DCP: ``shard_rank*.pt`` files and no ``.metadata``."""
    return not (directory / METADATA_FILE).exists() and any(directory.glob(LEGACY_SHARDS))


class CheckpointReader:
    """One checkpoint directory opened for reading: its entries' keys and shapes, then the entries asked for.

    Opening reads the index alone (``.metadata``, through the restricted unpickler); the
    legacy format has no index, so its shards are read whole at opening (its memory cost,
    kept only so old runs resume).
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._legacy: dict[str, Tensor] | None = read_legacy(directory) if is_legacy(directory) else None
        if self._legacy is not None:
            self.shapes = {key: value.shape for key, value in self._legacy.items()}
            self.dtypes = {key: value.dtype for key, value in self._legacy.items()}
        else:
            saved = load_metadata(directory).state_dict_metadata
            tensors = {key: md for key, md in saved.items() if isinstance(md, TensorStorageMetadata)}
            self.shapes = {key: md.size for key, md in tensors.items()}
            self.dtypes = {key: md.properties.dtype for key, md in tensors.items()}

    def read_into(self, targets: dict[str, Tensor]) -> None:
        """Fills each tensor of ``targets`` (views into the model and optimizer are fine) with its saved entry.

        Reads only those entries' bytes. Keys and shapes must have been checked against
        :attr:`shapes` (``sharded_checkpoint`` does, naming what is missing).
        """
        if self._legacy is not None:
            with torch.no_grad():
                for key, target in targets.items():
                    target.copy_(self._legacy[key])
            return
        try:
            dcp.load(targets, storage_reader=SafeFileSystemReader(self.directory), no_dist=True)
        except CheckpointException as err:
            _rank, cause = _first_failure(err)
            if isinstance(cause, ConfigError):
                raise cause from err
            raise ConfigError("train.resume", str(self.directory), "checkpoint data is unreadable or corrupt "
                              f"({_one_line(cause)})") from err


def read_entries(directory: Path) -> dict[str, Tensor]:
    """Every entry of a checkpoint, whatever its format: for tools and tests that compare whole checkpoints."""
    reader = CheckpointReader(directory)
    entries = {key: torch.empty(shape, dtype=reader.dtypes[key]) for key, shape in reader.shapes.items()}
    reader.read_into(entries)
    return entries


def read_legacy(directory: Path) -> dict[str, Tensor]:
    """All entries of a ``shard_rank*.pt`` checkpoint (each file read whole, ``weights_only``)."""
    entries: dict[str, Tensor] = {}
    for shard in sorted(directory.glob(LEGACY_SHARDS)):
        try:
            entries.update(torch.load(shard, map_location="cpu", weights_only=True))
        except Exception as err:  # torch raises several types for truncated or foreign files
            raise ConfigError("train.resume", str(directory), f"shard {shard.name} is unreadable or corrupt "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    return entries
