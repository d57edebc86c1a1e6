"""Data pipeline: text sources (embedded stdlib, local files, Hub) -> tokens (bytes, a trained BPE
or a tokenizer.json; in memory, or token shards on disk read a window at a time) -> batches.

Typical use::

    source = build_batch_source(cfg.data, cfg.train.batch_size, cfg.train.seed)
    inputs, targets = source.train_batch(step, rank, world)  # int64 [B / world, seq_len] each
    val = source.val_batches(cfg.train.eval_batches, cfg.train.batch_size)
"""

from moe_trainer.data.batches import Batch, BatchSource, build_batch_source, step_seed, tokenize_split
from moe_trainer.data.shards import build_token_cache, cached_streams
from moe_trainer.data.sources import (
    TEXT_COLUMN,
    embedded_corpus,
    hub_reachable,
    load_corpus,
    load_documents,
    split_documents,
    stdlib_source_files,
)
from moe_trainer.data.tokenizer import EOD_ID, ByteTokenizer, Tokenizer, build_tokenizer
from moe_trainer.data.tokenizer_file import FileTokenizer

__all__ = [
    "EOD_ID",
    "TEXT_COLUMN",
    "Batch",
    "BatchSource",
    "ByteTokenizer",
    "FileTokenizer",
    "Tokenizer",
    "build_batch_source",
    "build_token_cache",
    "build_tokenizer",
    "cached_streams",
    "embedded_corpus",
    "hub_reachable",
    "load_corpus",
    "load_documents",
    "split_documents",
    "stdlib_source_files",
    "step_seed",
    "tokenize_split",
]
