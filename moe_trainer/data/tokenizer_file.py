"""A Hugging Face ``tokenizers`` tokenizer read from a ``tokenizer.json``: a user's, or a trained BPE.

The file's exact bytes are the tokenizer's identity (:attr:`FileTokenizer.digest`, their
sha256): the token cache keys on it and checkpoints record it, so ids made by one tokenizer
are never read as another's. Every check a user's file needs (it exists, parses, has an
end-of-document token, fits the embedding) is a :class:`ConfigError` naming the setting.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_trainer.config.errors import ConfigError, first_line
from moe_trainer.data.tokenizer import MAX_VOCAB, ids_array

TOKENIZER_FILE = "tokenizer.json"  # the name in a tokenizer directory, a run dir, a checkpoint, a shard dir
# special tokens that end a document in common tokenizers, in the order they are looked for
EOD_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]")


class FileTokenizer:
    """Ids from a ``tokenizers.Tokenizer`` built from `json_text` (a tokenizer.json's contents).

    Special tokens written in a document's text are encoded as text (``encode_special_tokens``),
    so the end-of-document id appears only where the pipeline puts it, as with the byte
    tokenizer; template post-processors (BOS/CLS) are not applied for the same reason.
    """

    def __init__(self, json_text: str, setting: str = "data.tokenizer", where: str = "") -> None:
        """`setting` and `where` (the file, for messages) name what a ConfigError blames."""
        from tokenizers import Tokenizer as HFTokenizer

        where = where or "the tokenizer"
        try:
            tok = HFTokenizer.from_str(json_text)
        except Exception as err:  # the Rust parser raises plain Exception for any malformed JSON
            raise ConfigError(setting, where, f"is not a Hugging Face tokenizer.json ({first_line(err)}); "
                              "give a tokenizer.json saved by the `tokenizers` library (or a directory "
                              "holding one), or use data.tokenizer=byte or data.tokenizer=bpe") from err
        tok.encode_special_tokens = True
        vocab = tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise ConfigError(setting, where, "has an empty vocabulary; give a trained tokenizer.json")
        size = max(vocab.values()) + 1  # ids may be sparse: the embedding needs a row for the largest
        if size > MAX_VOCAB:
            raise ConfigError(setting, where, f"has ids up to {size - 1:,}, more than the {MAX_VOCAB:,} embedding "
                              f"rows a model of this trainer takes (moe_trainer.data.tokenizer.MAX_VOCAB); use a "
                              "tokenizer with a smaller vocabulary, or data.tokenizer=bpe with data.vocab_size "
                              f"<= {MAX_VOCAB}")
        eod = next((name for name in EOD_TOKENS if name in vocab), None)
        if eod is None:
            raise ConfigError(setting, where, "has no end-of-document token to put between documents; add one "
                              f"of {', '.join(EOD_TOKENS)} as a special token, or use data.tokenizer=bpe")
        self._tok, self.json = tok, json_text
        self.name = type(tok.model).__name__.lower()  # bpe, unigram, wordpiece, wordlevel
        self.vocab_size, self.eod_id, self.eod_token = size, vocab[eod], eod
        self.digest = hashlib.sha256(json_text.encode("utf-8")).hexdigest()

    @classmethod
    def from_file(cls, path: Path, setting: str = "data.tokenizer") -> FileTokenizer:
        """Reads `path` (a file, not a directory); a missing or unreadable file is a ConfigError."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(setting, str(path), f"cannot be read ({first_line(err)})") from err
        return cls(text, setting, str(path))

    def encode(self, text: str) -> np.ndarray:
        """Returns the ids of `text`, int64 [n_tokens]; lone surrogates become U+FFFD as they cannot be UTF-8."""
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        except TypeError:  # a str holding lone surrogates cannot cross into Rust
            ids = self._tok.encode(text.encode("utf-8", errors="replace").decode("utf-8"),
                                   add_special_tokens=False).ids
        return np.asarray(ids, dtype=np.int64)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` of each text, through ``tokenizers``' batch encoder (Rust threads, one call per batch)."""
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:  # a text with lone surrogates: encode one by one, replacing them
            return [self.encode(t) for t in texts]
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def decode(self, ids: Sequence[int] | np.ndarray | torch.Tensor) -> str:
        """Returns the text of 1-D `ids`, skipping special tokens; ids outside the vocabulary are an error."""
        return self._tok.decode(ids_array(ids, self.vocab_size, self.name).tolist(), skip_special_tokens=True)

    def save(self, path: Path) -> None:
        """Writes the exact bytes :attr:`digest` hashes, so the saved file has the same identity."""
        path.write_bytes(self.json.encode("utf-8"))

    def __getstate__(self) -> dict[str, Any]:
        # `tokenizers` pickles lose encode_special_tokens; rebuilding from the JSON keeps every setting
        return {"json": self.json}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["json"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return (f"FileTokenizer({self.name}, vocab_size={self.vocab_size}, eod={self.eod_token!r}, "
                f"sha256={self.digest[:12]})")


def load_tokenizer_file(path: Path, setting: str = "data.tokenizer") -> FileTokenizer:
    """Loads a tokenizer.json, or the one in directory `path`; anything else is a ConfigError naming `setting`."""
    given = path.expanduser()
    file = given / TOKENIZER_FILE if given.is_dir() else given
    if not file.is_file():
        what = f"the directory holds no {TOKENIZER_FILE}" if given.is_dir() else "no such file or directory"
        raise ConfigError(setting, str(path), f"{what}; use byte, bpe (trained on the training split), or the path "
                          f"of a Hugging Face {TOKENIZER_FILE} (or of a directory holding one)")
    return FileTokenizer.from_file(file, setting)
