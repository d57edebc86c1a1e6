"""Tokenizers: the byte tokenizer, a trained byte-level BPE and a tokenizer.json read from disk.

Lossless round trips, EOD handling, robustness to ids a model may emit, deterministic BPE
training, and one clear ConfigError for each bad tokenizer file.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Dataset

from moe_trainer.config.errors import ConfigError
from moe_trainer.data.bpe import EOD_TOKEN, train_bpe
from moe_trainer.data.tokenizer import EOD_ID, MAX_VOCAB, ByteTokenizer, Tokenizer, build_tokenizer
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer, load_tokenizer_file

TEXTS = ["", "hello world\n", "def f(x):\n    return x ** 2\n", "naïve café — 日本語 🚀", "\x00\x7f\t"]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_vocab_and_ids_in_range() -> None:
    tok = ByteTokenizer()
    assert tok.vocab_size == 257 and tok.eod_id == EOD_ID == 256
    ids = tok.encode("".join(chr(c) for c in range(1, 2000)))
    assert ids.min() >= 0 and ids.max() < 256  # encode never emits EOD


def test_decode_skips_eod_and_accepts_lists_arrays_tensors() -> None:
    tok = ByteTokenizer()
    ids = [104, 105, EOD_ID, 33]
    assert tok.decode(ids) == "hi!"
    assert tok.decode(np.array(ids)) == "hi!"
    assert tok.decode(torch.tensor(ids)) == "hi!"
    assert tok.decode(torch.tensor([[104], [105]])) == "hi"  # flattened


def test_decode_invalid_utf8_is_replaced_not_raised() -> None:
    tok = ByteTokenizer()
    cut = tok.encode("é")[:1]  # first byte of a two-byte character, as a model might emit
    assert tok.decode(cut) == "\ufffd"


def test_decode_rejects_ids_outside_vocab() -> None:
    with pytest.raises(ValueError, match="0, 256"):
        ByteTokenizer().decode([1, 257])


def test_lone_surrogate_encodes() -> None:
    assert ByteTokenizer().decode(ByteTokenizer().encode("a\ud800b")) == "a?b"


VOCAB = 300  # 256 bytes, EOD and 43 merges: enough to see merges, trained in milliseconds


@pytest.fixture(scope="module")
def train_split() -> Dataset:
    """A small English-and-code corpus with plenty of repeated pairs (about 20 KB)."""
    docs = [f"def f{i}(x):\n    return x * {i} + the_value\n" for i in range(200)]
    docs += [f"the quick brown fox {i} jumps over the lazy dog" for i in range(200)]
    return Dataset.from_dict({"text": docs})


@pytest.fixture(scope="module")
def bpe(train_split: Dataset) -> FileTokenizer:
    return train_bpe(train_split, VOCAB)


def test_bpe_training_is_deterministic_with_the_vocabulary_asked_and_eod_first(
        train_split: Dataset, bpe: FileTokenizer) -> None:
    again = train_bpe(train_split, VOCAB)
    assert again.json == bpe.json and again.digest == bpe.digest  # byte for byte: the same file, the same key
    assert bpe.vocab_size == VOCAB and bpe.name == "bpe" and isinstance(bpe, Tokenizer)
    assert bpe.eod_id == 0 and bpe.eod_token == EOD_TOKEN
    # merges were learnt from the corpus: its frequent words take fewer ids than bytes
    assert len(bpe.encode("the quick brown fox")) < len(b"the quick brown fox")
    assert train_bpe(train_split, VOCAB + 20).digest != bpe.digest


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_round_trip(bpe: FileTokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert ids.dtype == np.int64 and ids.ndim == 1
    assert ids.size == 0 or (ids.min() >= 0 and ids.max() < VOCAB)
    assert bpe.decode(ids) == text


def test_bpe_never_emits_eod_from_text_and_decode_skips_it(bpe: FileTokenizer) -> None:
    ids = bpe.encode(f"a{EOD_TOKEN}b")  # a document quoting the token is text, not a document boundary
    assert bpe.eod_id not in ids.tolist() and bpe.decode(ids) == f"a{EOD_TOKEN}b"
    assert bpe.decode([*bpe.encode("hi"), bpe.eod_id, *bpe.encode("!")]) == "hi!"
    assert bpe.decode(bpe.encode("a\ud800b")) == "a?b"  # as the byte tokenizer: lone surrogates are not UTF-8
    with pytest.raises(ValueError, match=f"0, {VOCAB - 1}"):
        bpe.decode([1, VOCAB])


def test_a_pickled_tokenizer_keeps_its_settings(bpe: FileTokenizer) -> None:
    """Dataset.map workers get the tokenizer pickled; `tokenizers` alone would forget encode_special_tokens."""
    copy = pickle.loads(pickle.dumps(bpe))
    assert copy.digest == bpe.digest
    assert copy.encode(f"x{EOD_TOKEN}").tolist() == bpe.encode(f"x{EOD_TOKEN}").tolist()


def test_a_tokenizer_json_loads_from_its_file_or_its_directory(bpe: FileTokenizer, tmp_path: Path) -> None:
    bpe.save(tmp_path / TOKENIZER_FILE)
    for given in (tmp_path / TOKENIZER_FILE, tmp_path):
        tok = build_tokenizer(str(given))
        assert isinstance(tok, FileTokenizer) and tok.digest == bpe.digest and tok.vocab_size == VOCAB
        assert tok.encode("def f(x)").tolist() == bpe.encode("def f(x)").tolist()


def _word_level(vocab: dict[str, int]) -> str:
    """A minimal tokenizer.json of another model type: whitespace-split words."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok.to_str()


def test_another_tokenizer_finds_its_end_of_document_token(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text(_word_level({"<unk>": 0, "hello": 1, "world": 2, "</s>": 3}))
    tok = load_tokenizer_file(tmp_path / "t.json")
    assert (tok.name, tok.vocab_size, tok.eod_id, tok.eod_token) == ("wordlevel", 4, 3, "</s>")
    assert tok.encode("hello world").tolist() == [1, 2]


BAD_FILES = {
    "missing": (None, "no such file or directory"),
    "not json": ("{ this is not json", "is not a Hugging Face tokenizer.json"),
    "not a tokenizer": (json.dumps({"vocab": {"a": 0}}), "is not a Hugging Face tokenizer.json"),
    "no end of document": (_word_level({"<unk>": 0, "hello": 1}), "no end-of-document token"),
    # one stray id past the cap would size the embedding by that id
    "ids past the embedding": (_word_level({"<unk>": 0, "</s>": MAX_VOCAB}), f"{MAX_VOCAB:,} embedding rows"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_a_bad_tokenizer_file_is_one_clear_config_error(case: str, tmp_path: Path) -> None:
    text, problem = BAD_FILES[case]
    path = tmp_path / "tokenizer.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=problem) as err:
        build_tokenizer(str(path))
    assert err.value.setting == "data.tokenizer" and err.value.value == str(path)


def test_a_directory_without_a_tokenizer_json_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the directory holds no tokenizer.json"):
        build_tokenizer(str(tmp_path))


def test_build_tokenizer() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer) and tok.digest is None
    with pytest.raises(ConfigError) as err:  # trained by the driver, never by a process that tokenises
        build_tokenizer("bpe")
    assert err.value.setting == "data.tokenizer" and "resolve_tokenizer" in str(err.value)
