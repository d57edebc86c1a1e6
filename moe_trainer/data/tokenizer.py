"""Tokenizers: text <-> integer ids, and the one place a ``data.tokenizer`` setting becomes one.

Three kinds, all behind the :class:`Tokenizer` protocol:

* ``byte``: UTF-8 bytes plus an end-of-document id. It needs no file, no download and no
  training, so every machine (including offline ones) can run the trainer on any text, and its
  256 + 1 ids keep the embedding table tiny for the small models this project trains.
* a Hugging Face ``tokenizers`` file (:mod:`moe_trainer.data.tokenizer_file`): a local
  ``tokenizer.json``, or one a run trained itself (``bpe``, :mod:`moe_trainer.data.bpe`).
* ``bpe`` itself is not a tokenizer yet: it names one the driver trains once, before any actor
  starts (:mod:`moe_trainer.train.run_tokenizer`), and every process then loads that file.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from moe_trainer.config.errors import ConfigError

EOD_ID = 256  # end-of-document id of the byte tokenizer: one past the largest byte value
BYTE, BPE = "byte", "bpe"  # the data.tokenizer values that are not paths
# The largest vocabulary (embedding rows) a model of this trainer gets: 2**18 = 262,144, the size
# of the largest vocabularies of released LMs (Gemma 3). Past it the embedding and LM head
# (2 x vocab x d_model parameters) outweigh every model shape this trainer targets, a local corpus
# cannot fill it, and a tokenizer.json whose ids reach further is almost always sparse (one
# stray added token at a huge id would size the embedding by that id, not by the tokens).
MAX_VOCAB = 1 << 18


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer."""

    name: str  # what kind it is, for messages and indexes: "byte", "bpe", "unigram", ...
    vocab_size: int  # embedding rows: every id is in [0, vocab_size)
    eod_id: int  # appended after every document
    digest: str | None  # sha256 of the tokenizer.json the ids come from; None for the byte tokenizer

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text` as a 1-D int64 array of shape [n_tokens] (no EOD appended)."""
        ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text (a tokenizer with a parallel batch encoder uses it here)."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Returns the text of `ids`, skipping special ids."""
        ...


def describe(name: str, vocab_size: int, digest: str | None) -> str:
    """A tokenizer in words, for messages: ``byte``, or ``bpe (500 ids, sha256 0123abcd4567)``."""
    return name if digest is None else f"{name} ({vocab_size} ids, sha256 {digest[:12]})"


def ids_array(ids: Sequence[int] | np.ndarray | torch.Tensor, vocab_size: int, name: str) -> np.ndarray:
    """Returns `ids` as a flat int64 array; ids outside [0, vocab_size) are a ValueError.

    Decoders are handed whatever a model emitted: an id past the vocabulary is a bug in the
    caller (a model of another vocabulary), never something to skip silently.
    """
    arr = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    arr = arr.reshape(-1).astype(np.int64, copy=False)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"{name} tokenizer ids must lie in [0, {vocab_size - 1}], got [{arr.min()}, {arr.max()}]")
    return arr


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus id 256 marking the end of a document.

    `encode` never fails (unencodable lone surrogates become '?'), and `decode` never fails
    either: a model can emit any id sequence, including cut-off multi-byte characters, and
    sampling must still print something, so invalid UTF-8 decodes to U+FFFD.
    """

    name = BYTE
    vocab_size = 257
    eod_id = EOD_ID
    digest = None  # no file: the ids are fixed by UTF-8

    def encode(self, text: str) -> np.ndarray:
        """Returns the UTF-8 bytes of `text` as int64 ids, shape [n_bytes]."""
        raw = text.encode("utf-8", errors="replace")
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text."""
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Returns the text of 1-D `ids`, dropping EOD ids; ids outside [0, 256] are an error."""
        arr = ids_array(ids, self.vocab_size, "byte")
        return arr[arr != EOD_ID].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def build_tokenizer(setting: str) -> Tokenizer:
    """Returns the tokenizer ``data.tokenizer`` names: ``byte``, or the path of a tokenizer.json (or its folder).

    ``bpe`` is refused here: it must be trained once by the driver (or ``moe-prepare-data``),
    which then hands every process the path of the file it wrote
    (:func:`moe_trainer.train.run_tokenizer.resolve_tokenizer`); a process that trained its own
    would cost the training again per actor.
    """
    if setting == BYTE:
        return ByteTokenizer()
    if setting == BPE:
        raise ConfigError("data.tokenizer", setting, "a BPE is trained once by moe-train or moe-prepare-data, "
                          "before any process tokenises; call moe_trainer.train.run_tokenizer.resolve_tokenizer "
                          "(or moe_trainer.data.bpe.train_bpe) and pass the tokenizer.json path it saves")
    from moe_trainer.data.tokenizer_file import load_tokenizer_file  # imports `tokenizers` only when used

    return load_tokenizer_file(Path(setting))
