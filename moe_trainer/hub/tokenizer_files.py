"""The tokenizer files of an exported model: ``tokenizer.json`` and the configs ``transformers`` reads beside it.

The byte tokenizer (:class:`~moe_trainer.data.tokenizer.ByteTokenizer`) becomes an equivalent
``tokenizers`` tokenizer: a byte-level BPE with the 256 byte symbols as ids 0..255 in byte order
and no merges (every byte its own token, as ours), plus ``<|endoftext|>`` at id 256, our
end-of-document id. A run's own ``tokenizer.json`` (a trained BPE, a user's file) is copied byte
for byte, so its sha256, the identity checkpoints record, stays the same.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from moe_trainer.data.tokenizer import EOD_ID, Tokenizer
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE

BYTE_EOD_TOKEN = "<|endoftext|>"


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte value 0..255 (what ``ByteLevel`` maps bytes to)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbol = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbol:
            symbol[b] = chr(256 + extra)
            extra += 1
    return [symbol[b] for b in range(256)]


@cache
def byte_tokenizer_json() -> str:
    """The ``tokenizer.json`` equivalent to the byte tokenizer (ids = UTF-8 bytes, 256 = end of document)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {s: b for b, s in enumerate(byte_symbols())}
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BYTE_EOD_TOKEN])
    return tok.to_str()


def tokenizer_content(path: Path) -> Any:
    """The parsed JSON of a tokenizer.json (or of the one in directory ``path``); None if unreadable.

    Tokenizers are compared by content, not bytes: the same tokenizer saved twice may differ in layout.
    """
    file = path / TOKENIZER_FILE if path.is_dir() else path
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_byte_tokenizer(path: Path) -> bool:
    """Whether ``path`` (a tokenizer.json) is the byte tokenizer as :func:`byte_tokenizer_json` writes it."""
    return tokenizer_content(path) == json.loads(byte_tokenizer_json())


def _eod_token(tokenizer: Tokenizer) -> str:
    return BYTE_EOD_TOKEN if tokenizer.eod_id == EOD_ID and tokenizer.digest is None else \
        str(tokenizer.eod_token)


def write_tokenizer(directory: Path, tokenizer: Tokenizer, max_len: int) -> list[str]:
    """``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``; returns their names."""
    if tokenizer.digest is None:
        (directory / TOKENIZER_FILE).write_text(byte_tokenizer_json(), encoding="utf-8")
    else:
        tokenizer.save(directory / TOKENIZER_FILE)  # type: ignore[attr-defined]
    eod = _eod_token(tokenizer)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod, "bos_token": None,
                              "pad_token": None, "unk_token": None, "model_max_length": max_len,
                              "clean_up_tokenization_spaces": False, "add_bos_token": False, "add_eos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": eod}, indent=2))
    return [TOKENIZER_FILE, "tokenizer_config.json", "special_tokens_map.json"]
