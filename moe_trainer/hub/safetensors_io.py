"""``*.safetensors`` as the Hub lays them out: one ``model.safetensors``, or shards with an index.

Written in shards of at most ``max_shard_bytes`` (``model-00001-of-00003.safetensors`` plus
``model.safetensors.index.json``, the names ``transformers``' ``save_pretrained`` uses); read one
tensor at a time through ``safe_open`` (memory-mapped), so a process that needs two experts of a
large checkpoint reads two experts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' default max_shard_size


def write_weights(directory: Path, tensors: dict[str, Tensor], max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[str]:
    """Writes ``tensors`` (contiguous, in order) into ``directory``; returns the file names written."""
    from safetensors.torch import save_file

    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                   indent=2))
    return [*names, INDEX_FILE]


class HubWeights:
    """The tensors of a ``transformers`` model directory, by name; opens each file once, lazily."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        if (directory / INDEX_FILE).is_file():
            self.files: dict[str, str] = dict(json.loads((directory / INDEX_FILE).read_text())["weight_map"])
        elif (directory / SINGLE_FILE).is_file():
            from safetensors import safe_open

            with safe_open(str(directory / SINGLE_FILE), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE_FILE)
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {directory}")
        self._open: dict[str, object] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _file(self, name: str) -> Any:  # safetensors' file handle has no public type
        from safetensors import safe_open

        file = self.files[name]
        if file not in self._open:
            self._open[file] = safe_open(str(self.directory / file), framework="pt")
        return self._open[file]

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """safetensors' name of the stored dtype: ``F32``, ``BF16``, ``F16``, ``F8_E4M3``, ``I8``, ..."""
        return str(self._file(name).get_slice(name).get_dtype())

    def get(self, name: str) -> Tensor:
        return self._file(name).get_tensor(name)


FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")  # stored weights read as they are (8-bit floats need their scales)


def read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged or foreign set of safetensors files raises."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, SafetensorError)
