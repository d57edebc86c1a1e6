"""Token streams and the batches the trainer reads from them.

Each split is tokenised once into one 1-D stream (documents joined, each followed by the
end-of-document id): int64 in memory, or, with ``data.token_cache`` set, uint16/uint32 read from
from the token cache of :mod:`moe_trainer.data.shards` (the same ids, so the same batches).
A training batch is a set of random windows of ``seq_len + 1`` tokens; the
window starts are a pure function of ``(seed, step)``. That gives, without any saved RNG state:

* resume: step ``s`` after a restart reads exactly the data it read before;
* data parallelism: every rank draws the same global batch and keeps its own contiguous rows,
  so ``world`` ranks together see exactly the batch one process would (same loss, same updates).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset, DatasetDict

from moe_trainer.config.errors import ConfigError
from moe_trainer.data.shards import TokenFile, cached_streams
from moe_trainer.data.sources import TEXT_COLUMN, CorpusSource, corpus_source, load_corpus
from moe_trainer.data.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    from moe_trainer.config.schema import DataConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (inputs, targets), both int64 [rows, seq_len]

_MASK64 = (1 << 64) - 1


def tokenize_split(ds: Dataset, tokenizer: Tokenizer, batch_size: int = 1024) -> torch.Tensor:
    """Returns the documents of `ds` as one int64 stream of shape [n_tokens].

    Every document is followed by ``tokenizer.eod_id``, so the model learns where documents end
    and windows that span two documents see the boundary. Read in batches straight from Arrow
    (no ``Dataset.map``), so nothing is written to the HF cache and 4 MB takes well under a second.
    """
    pieces: list[np.ndarray] = []
    eod = np.array([tokenizer.eod_id], dtype=np.int64)
    for batch in ds.select_columns([TEXT_COLUMN]).iter(batch_size=batch_size):
        for ids in tokenizer.encode_batch(batch[TEXT_COLUMN]):
            pieces.append(ids)
            pieces.append(eod)
    if not pieces:
        return torch.empty(0, dtype=torch.int64)
    return torch.from_numpy(np.concatenate(pieces))


def step_seed(seed: int, step: int) -> int:
    """Returns a 63-bit generator seed for (seed, step), mixed by SplitMix64.

    Mixing (rather than ``seed + step``) keeps neighbouring runs from replaying each other's
    batches shifted by a few steps (run seed 1 at step 0 would equal seed 0 at step 1).
    """
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & ((1 << 63) - 1)


def _rank_rows(batch_size: int, rank: int, world: int) -> slice:
    """Returns the rows [rank*B/world, (rank+1)*B/world) of a global batch of B rows that `rank` owns."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= rank < world and world >= 1, got rank={rank}, world={world}")
    if batch_size % world:
        raise ConfigError(
            "train.batch_size",
            batch_size,
            f"must divide by the {world} data-parallel ranks; use a multiple of {world}",
        )
    per_rank = batch_size // world
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _check_stream(tokens: torch.Tensor, seq_len: int, split: str) -> None:
    """Raises a ConfigError naming data.seq_len when `tokens` cannot hold one window of seq_len+1."""
    if tokens.numel() < seq_len + 1:
        raise ConfigError(
            "data.seq_len",
            seq_len,
            f"the {split} split has only {tokens.numel()} tokens, fewer than data.seq_len + 1; "
            f"lower data.seq_len or use more data (for validation, a larger data.val_fraction)",
        )


class BatchSource:
    """Training and validation batches over tokenised train/validation streams.

    Attributes:
        train_tokens: [n_train_tokens], the training stream: int64 in memory, or uint16/uint32
            the token cache's files (:class:`~moe_trainer.data.shards.TokenFile`: windows read as needed).
        val_tokens: [n_val_tokens], the validation stream, like `train_tokens`.
        seq_len: tokens per sequence (inputs and targets are each [rows, seq_len]).
        batch_size: global batch size B in sequences, split across ranks.
        seed: with the step, determines every training batch.
        tokenizer: the tokenizer the streams were made with (``vocab_size`` sizes the model).
    """

    def __init__(
        self,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor,
        *,
        seq_len: int,
        batch_size: int,
        seed: int,
        tokenizer: Tokenizer,
    ) -> None:
        if seq_len < 1:
            raise ConfigError("data.seq_len", seq_len, "must be at least 1")
        if batch_size < 1:
            raise ConfigError("train.batch_size", batch_size, "must be at least 1")
        _check_stream(train_tokens, seq_len, "train")
        _check_stream(val_tokens, seq_len, "validation")
        # kept in their own dtype: a cached uint16 stream stays 2 bytes a token and on disk
        self.train_tokens = train_tokens.contiguous()
        self.val_tokens = val_tokens.contiguous()
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.tokenizer = tokenizer
        self._offsets = torch.arange(seq_len + 1)  # [seq_len + 1], added to window starts

    @property
    def vocab_size(self) -> int:
        """Number of token ids the model must embed."""
        return self.tokenizer.vocab_size

    def _windows(self, tokens: torch.Tensor, starts: torch.Tensor) -> Batch:
        """Returns (inputs, targets), each [len(starts), seq_len], cut from `tokens` at `starts`."""
        if isinstance(tokens, TokenFile):  # the token cache: read with pread, not mapped
            windows = tokens.windows(starts, self.seq_len + 1).to(torch.int64)
        else:
            windows = tokens[starts[:, None] + self._offsets].to(torch.int64)  # [rows, seq_len + 1]
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()

    def global_starts(self, step: int) -> torch.Tensor:
        """Returns the B window starts of step `step`'s global batch, int64 [batch_size].

        Drawn uniformly (with replacement) from a generator seeded by (seed, step) only.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        gen = torch.Generator().manual_seed(step_seed(self.seed, step))
        n_starts = self.train_tokens.numel() - self.seq_len  # starts 0 .. n - seq_len - 1
        return torch.randint(0, n_starts, (self.batch_size,), generator=gen, dtype=torch.int64)

    def train_batch(self, step: int, rank: int = 0, world: int = 1) -> Batch:
        """Returns rank `rank`'s share of step `step`'s global batch: (inputs, targets) [B/world, seq_len]

        Rank r gets global rows [r*B/world, (r+1)*B/world), so concatenating all ranks' shards in
        rank order gives exactly the ``world=1`` batch.
        """
        rows = _rank_rows(self.batch_size, rank, world)
        return self._windows(self.train_tokens, self.global_starts(step)[rows])

    def val_batches(self, n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[Batch]:
        """Returns `n` fixed validation batches: (inputs, targets), each [batch_size/world, seq_len].

        The n * batch_size windows are spread evenly over the whole validation stream (first window
        at its start, last at its end), so every call returns the same batches and they cover the
        split as well as that many windows can. Ranks take contiguous rows as in `train_batch`.
        """
        if n < 1:
            raise ValueError(f"need at least one validation batch, got n={n}")
        rows = _rank_rows(batch_size, rank, world)
        last_start = self.val_tokens.numel() - self.seq_len - 1
        starts = torch.linspace(0, last_start, n * batch_size, dtype=torch.float64).round().to(torch.int64)
        starts = starts.view(n, batch_size)[:, rows]  # [n, batch_size / world]
        return [self._windows(self.val_tokens, s) for s in starts]

    def __repr__(self) -> str:
        return (
            f"BatchSource(train_tokens={self.train_tokens.numel()}, val_tokens={self.val_tokens.numel()}, "
            f"seq_len={self.seq_len}, batch_size={self.batch_size}, seed={self.seed}, "
            f"tokenizer={self.tokenizer.name!r})"
        )


def build_batch_source(
    data_cfg: DataConfig,
    batch_size: int,
    seed: int,
    *,
    corpus: DatasetDict | None = None,
    cache_dir: str | None = None,
) -> BatchSource:
    """Loads (or takes) the corpus, tokenises both splits and returns their BatchSource.

    With ``data.token_cache`` set the streams are read from the token cache there (windows by ``pread``),
    tokenised only by the first process that finds it missing (the others, and every later
    start, never load the corpus); unset, they are tokenised into memory. `corpus` skips
    loading when the caller already has the ``load_corpus`` result (e.g. to log document
    counts); `cache_dir` is passed to ``load_corpus``.
    """
    tokenizer = build_tokenizer(data_cfg.tokenizer)
    if data_cfg.token_cache:
        source = CorpusSource.of(corpus) if corpus is not None else corpus_source(data_cfg, cache_dir=cache_dir)
        streams = cached_streams(source, tokenizer, data_cfg.token_cache, data_cfg.tokenize_procs)
    else:
        corpus = corpus if corpus is not None else load_corpus(data_cfg, cache_dir=cache_dir)
        streams = {split: tokenize_split(corpus[split], tokenizer) for split in ("train", "validation")}
    return BatchSource(
        streams["train"],
        streams["validation"],
        seq_len=data_cfg.seq_len,
        batch_size=batch_size,
        seed=seed,
        tokenizer=tokenizer,
    )
