"""Reading a DCP checkpoint's ``.metadata`` without unpickling arbitrary objects.

``torch.distributed.checkpoint.FileSystemReader`` reads ``.metadata`` with a plain
``pickle.load``: a checkpoint directory from anywhere (a shared drive, a download)
could run code on every rank that loads it. The tensor data itself is read with
``torch.load(weights_only=True)``, so the metadata file is the one door left. Here it
is read by an Unpickler that knows only the classes DCP's metadata is made of and the
torch and standard-library types they hold; anything else is refused before any of it
is constructed.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
import torch.serialization
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from moe_trainer.config.errors import ConfigError

METADATA_FILE = ".metadata"

# (module, name) -> the object a DCP metadata pickle may name: its dataclasses, torch.Size, dtypes and
# layouts, and the path type of StorageMeta.checkpoint_id
_ALLOWED: dict[tuple[str, str], Any] = {
    **{(dcp_metadata.__name__, name): getattr(dcp_metadata, name) for name in (
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")},
    (dcp_filesystem.__name__, "_StorageInfo"): dcp_filesystem._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,  # maps a layout's name to torch's own
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "Path"): pathlib.Path,
}


class _MetadataUnpickler(pickle.Unpickler):
    """Resolves only the names of :data:`_ALLOWED` and torch's dtypes; every other name is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"it names {module}.{name}, which DCP metadata never holds")


def load_metadata(path: pathlib.Path) -> Metadata:
    """The :class:`Metadata` of the DCP checkpoint in directory ``path``; a :class:`ConfigError` if it is not one.

    Refuses (naming ``train.resume``) a missing or unreadable file, a pickle that names any
    object outside DCP's metadata classes, and a pickle of something else than ``Metadata``.
    """
    file = path / METADATA_FILE
    try:
        data = file.read_bytes()
    except OSError as err:
        raise ConfigError("train.resume", str(path), f"checkpoint has no readable {METADATA_FILE} ({err.strerror}); "
                          "give another step_* directory or start a new run") from err
    try:
        metadata = _MetadataUnpickler(io.BytesIO(data)).load()
    except Exception as err:  # UnpicklingError, EOFError, and whatever a damaged stream makes pickle raise
        raise ConfigError("train.resume", str(path), f"{METADATA_FILE} was refused, not loaded: "
                          f"{type(err).__name__}: {err}; only torch.distributed.checkpoint metadata is "
                          "read (nothing in it was run)") from err
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ConfigError("train.resume", str(path), f"{METADATA_FILE} holds a {type(metadata).__name__}, not "
                          "torch.distributed.checkpoint metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with :func:`load_metadata` in place of its ``pickle.load`` of ``.metadata``."""

    def __init__(self, path: pathlib.Path) -> None:
        super().__init__(path)
        self.directory = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:  # DCP's fallback to per-rank metadata, a format we never write
            raise FileNotFoundError(f"no per-rank metadata in {self.directory}")
        metadata = load_metadata(self.directory)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata
