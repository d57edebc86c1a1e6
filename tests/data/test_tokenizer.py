"""Byte tokenizer: lossless round trip, EOD handling, robustness to ids a model may emit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moe_trainer.config.errors import ConfigError
from moe_trainer.data.tokenizer import EOD_ID, ByteTokenizer, Tokenizer, build_tokenizer

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


def test_build_tokenizer() -> None:
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and isinstance(tok, Tokenizer)
    with pytest.raises(ConfigError) as err:
        build_tokenizer("bpe")
    assert err.value.setting == "data.tokenizer" and "byte" in str(err.value)
