"""``data.tokenizer=bpe``: a byte-level BPE trained on the training split, once, deterministically.

Byte-level (GPT-2's scheme): the 256 byte values are the base alphabet, so any text encodes with
no unknown token and decodes back exactly; merges are learnt from the training split only (the
validation split never shapes the vocabulary it is scored with). The one special token,
``<|endoftext|>`` (id 0), ends every document.

Deterministic: the trainer has no randomness, the byte alphabet is sorted before ids are given,
and without a continuing-subword prefix or end-of-word suffix no id depends on hash-map order
(huggingface/tokenizers#1794, which affects only those), so the same split and vocabulary size
give the same file, byte for byte; the tests check it.

Trained BPEs are kept in ``<token cache>/tokenizers/bpe-<key>.json`` when a token cache is in
use, keyed by the split's ``datasets`` fingerprint, the vocabulary size, the recipe version and
the ``tokenizers`` version, so ``moe-prepare-data`` trains it and later runs only load it.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

from datasets import Dataset

from moe_trainer.data.sources import TEXT_COLUMN, CorpusSource, loaded_identity
from moe_trainer.data.tokenizer_file import FileTokenizer

EOD_TOKEN = "<|endoftext|>"
MIN_VOCAB = 257  # the 256 byte values and the end-of-document token: a BPE with no merge yet
DEFAULT_VOCAB = 8192  # data.vocab_size when null: 3.8x fewer tokens than bytes on the embedded corpus (measured)
RECIPE_VERSION = 1  # bump when train_bpe's recipe changes: trained files in token caches are then retrained
STORE_DIR = "tokenizers"  # under a token cache root


def bpe_vocab_size(vocab_size: int | None) -> int:
    """The vocabulary a BPE is trained to: ``data.vocab_size``, or :data:`DEFAULT_VOCAB` when null."""
    return DEFAULT_VOCAB if vocab_size is None else vocab_size


def _texts(train: Dataset, batch_size: int = 1000) -> Iterator[list[str]]:
    """The split's documents in batches, streamed from Arrow (never the whole split as Python strings)."""
    for batch in train.select_columns([TEXT_COLUMN]).iter(batch_size=batch_size):
        yield batch[TEXT_COLUMN]


def train_bpe(train: Dataset, vocab_size: int) -> FileTokenizer:
    """Trains a byte-level BPE of `vocab_size` ids (fewer only if the split runs out of pairs) on `train`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_texts(train), trainer, length=len(train))
    return FileTokenizer(tok.to_str(), "data.vocab_size", f"a BPE of {vocab_size} ids")


def bpe_key(identity: str, vocab_size: int) -> str:
    """What a trained BPE depends on, hashed (16 hex digits): the corpus, the size, the recipe, the library.

    `identity` names the corpus as the token cache does (:class:`~moe_trainer.data.sources.CorpusSource`),
    so a stored BPE is found without loading the corpus, and on every machine alike.
    """
    import tokenizers

    parts = {"corpus": identity, "vocab_size": vocab_size, "recipe": RECIPE_VERSION,
             "tokenizers": tokenizers.__version__}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def stored_bpe(source: CorpusSource, vocab_size: int, root: str | os.PathLike[str]
               ) -> tuple[FileTokenizer, Path, bool]:
    """The BPE of `source`'s training split kept under token cache `root`, trained and stored on first use.

    Returns (tokenizer, its file, trained). The corpus is loaded only to train. The file is
    written to a unique temporary name and renamed into place, so a reader never sees half a
    file; two processes training at once write identical bytes, so whichever rename lands last
    changes nothing. A file that no longer loads (cut short by a full disk) is trained again.
    """
    corpus = None if source.identity is not None else source.load()
    identity = source.identity if corpus is None else loaded_identity(corpus)
    path = Path(root).expanduser() / STORE_DIR / f"bpe-{bpe_key(identity, vocab_size)}.json"
    if path.is_file():
        try:
            return FileTokenizer.from_file(path), path, False
        except ValueError:  # ConfigError: not a tokenizer any more; retrain below
            pass
    tok = train_bpe((corpus if corpus is not None else source.load())["train"], vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex}")
    tok.save(tmp)
    os.replace(tmp, path)
    return tok, path, True
