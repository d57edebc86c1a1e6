"""data.streaming: a datasets stream tokenised straight into the token cache, never stored as Arrow."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, DataConfig
from moe_trainer.config.validate import validate
from moe_trainer.data import ByteTokenizer, build_batch_source
from moe_trainer.data.shards import SPLITS, build_token_cache, map_stream
from moe_trainer.data.sources import corpus_source, source_identity
from moe_trainer.data.streaming import in_validation

DOCS = [f"document {i}: " + "some words of real text " * (3 + i % 5) for i in range(300)]


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.jsonl"
    rows = [{"text": t} for t in DOCS[:150]] + [{"text": "   "}] + [{"text": t} for t in DOCS[150:]]  # one blank
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_held_out_documents_are_a_seeded_share_of_the_stream() -> None:
    held = [in_validation(i, 0.1, seed=0) for i in range(20_000)]
    assert held == [in_validation(i, 0.1, seed=0) for i in range(20_000)]  # the same documents every time
    assert 0.09 < sum(held) / len(held) < 0.11
    assert held != [in_validation(i, 0.1, seed=1) for i in range(20_000)]


def test_a_stream_is_tokenised_into_the_cache_without_an_arrow_copy(jsonl: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    hf_cache = tmp_path / "hf"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(hf_cache))
    cfg = DataConfig(paths=[str(jsonl)], streaming=True, val_fraction=0.2, token_cache=str(tmp_path / "tokens"))
    directory, index, written = build_token_cache(corpus_source(cfg), ByteTokenizer(), cfg.token_cache)
    assert written
    rows = DOCS[:150] + ["   "] + DOCS[150:]  # positions in the stream count the blank row too
    want = {s: [] for s in SPLITS}
    for position, text in enumerate(rows):
        if text.strip():
            want["validation" if in_validation(position, 0.2, 0) else "train"].append(text)
    for split in SPLITS:
        expected = np.concatenate([np.append(ByteTokenizer().encode(t), 256) for t in want[split]])
        assert torch.equal(map_stream(directory, index, split).to(torch.int64), torch.from_numpy(expected))
    assert 0 < len(want["validation"]) < len(want["train"])
    assert not list(hf_cache.rglob("*.arrow"))  # the text was never stored
    again = build_token_cache(corpus_source(cfg), ByteTokenizer(), cfg.token_cache)
    assert not again[2] and again[0] == directory  # the next start maps it
    batch = build_batch_source(cfg, batch_size=4, seed=0).train_batch(0)[0]
    assert batch.shape[0] == 4 and batch.dtype == torch.int64


def test_streaming_names_another_cache_than_the_map_style_split(jsonl: Path) -> None:
    assert source_identity(DataConfig(paths=[str(jsonl)], streaming=True)) != source_identity(
        DataConfig(paths=[str(jsonl)]))
    assert source_identity(DataConfig(hub_name="a/b", streaming=True)) is not None  # a stream is named by its name


@pytest.mark.parametrize("overrides,problem", [
    (["data.streaming=true", "data.token_cache=null"], "set data.token_cache"),
    (["data.streaming=true", "data.tokenizer=bpe"], "tokenizer.json"),
])
def test_streaming_refuses_what_a_stream_cannot_serve(make_config: Callable[..., Config], overrides: list[str],
                                                      problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        validate(make_config(*overrides))
    assert err.value.setting == "data.streaming"
