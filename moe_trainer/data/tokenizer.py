"""Tokenizers: text <-> integer ids.

Only a byte-level tokenizer exists for now. It needs no vocabulary file, no download and no
training, so every machine (including offline ones) can run the trainer on any text, and its
256 + 1 ids keep the embedding table tiny for the small models this project trains.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from moe_trainer.config.errors import ConfigError

EOD_ID = 256  # end-of-document id of the byte tokenizer: one past the largest byte value


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer, so other tokenizers can be added later."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as a 1-D int64 array of shape [n_tokens] (no EOD appended)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Returns the text of `ids`, skipping special ids."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus id 256 marking the end of a document.

    `encode` never fails (unencodable lone surrogates become '?'), and `decode` never fails
    either: a model can emit any id sequence, including cut-off multi-byte characters, and
    sampling must still print something, so invalid UTF-8 decodes to U+FFFD.
    """

    name = "byte"
    vocab_size = 257
    eod_id = EOD_ID

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as int64 ids, shape [n_bytes]."""
        raw = text.encode("utf-8", errors="replace")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Returns the text of 1-D `ids`, dropping EOD ids; ids outside [0, 256] are an error."""
        arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
        arr = arr.reshape(-1).astype(np.int64, copy=False)
        if arr.size and (arr.min() < 0 or arr.max() > EOD_ID):
            raise ValueError(f"byte tokenizer ids must lie in [0, {EOD_ID}], got [{arr.min()}, {arr.max()}]")
        return arr[arr != EOD_ID].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


_TOKENIZERS: dict[str, type[ByteTokenizer]] = {"byte": ByteTokenizer}


def build_tokenizer(name: str) -> Tokenizer:
    """Returns the tokenizer that `data.tokenizer` names."""
    if name not in _TOKENIZERS:
        raise ConfigError("data.tokenizer", name, f"unknown tokenizer; choose one of {sorted(_TOKENIZERS)}")
    return _TOKENIZERS[name]()
