"""``data.streaming``: read the corpus as a ``datasets.IterableDataset`` and tokenise it straight into the token cache.

For a source whose text should never be stored (larger than the disk holds twice, or a Hub
dataset too big to download whole): ``load_dataset(..., streaming=True)`` reads it record by
record, and each document's ids go directly into the cache's flat files, so the text is never
written as Arrow (neither to the HF cache nor to a ``map`` cache) and never held in memory
whole. Training then maps the cache as usual, so the batch at step s stays a pure function of
(seed, s), resume and the equivalence between layouts are unchanged.

What differs from the map-style path: a stream cannot be shuffled and counted before it is
split, so a document goes to validation when a seeded hash of its position in the stream falls
below ``data.val_fraction`` (the same documents every time, about that share of them) instead
of an exact seeded sample; tokenising runs in this one process (a file tokenizer's batch
encoder uses threads). A ``data.tokenizer=bpe`` would have to be trained on the stream first:
train it on a sample and pass its ``tokenizer.json`` instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator

import datasets
import pyarrow as pa

from moe_trainer.config.errors import ConfigError, first_line
from moe_trainer.config.schema import DataConfig
from moe_trainer.data.paths import expand_data_paths, resolve_format
from moe_trainer.data.sources import TEXT_COLUMN, embedded_corpus

BATCH_DOCUMENTS = 256  # documents handed to the tokenizer at once


def in_validation(position: int, val_fraction: float, seed: int) -> bool:
    """Whether the document at `position` of the stream is held out: a seeded hash below `val_fraction`."""
    digest = hashlib.blake2b(f"{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def _records(data_cfg: DataConfig) -> tuple[Iterable[dict], str, str]:
    """The source as an iterable of records, the field holding the text, and where it comes from."""
    if data_cfg.paths:
        files = expand_data_paths(list(data_cfg.paths))
        builder = resolve_format(files, data_cfg.format)
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        stream = datasets.load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
        return stream, TEXT_COLUMN if builder == "text" else data_cfg.text_field, f"{builder} files {files}"
    if data_cfg.hub_name:
        stream = datasets.load_dataset(data_cfg.hub_name, data_cfg.hub_config, split="train", streaming=True)
        return stream, data_cfg.text_field, f"Hub dataset {data_cfg.hub_name}"
    return embedded_corpus(data_cfg.embedded_max_bytes).to_iterable_dataset(), TEXT_COLUMN, "the embedded corpus"


def stream_documents(data_cfg: DataConfig, split_seed: int) -> Iterator[list[tuple[bool, str]]]:
    """Batches of (held out for validation, text) for every non-empty document, in stream order."""
    stream, field, origin = _records(data_cfg)
    setting = "data.hub_name" if data_cfg.hub_name else "data.paths"
    batch: list[tuple[bool, str]] = []
    try:
        for position, record in enumerate(stream):
            if field not in record:
                raise ConfigError("data.text_field", field, f"no such field in {origin}; its records have "
                                  f"{sorted(record)}; set data.text_field to one of them")
            text = record[field]
            if isinstance(text, str) and text.strip():
                batch.append((in_validation(position, data_cfg.val_fraction, split_seed), text))
            if len(batch) == BATCH_DOCUMENTS:
                yield batch
                batch = []
    except ConfigError:
        raise
    except (datasets.exceptions.DatasetsError, pa.ArrowException, ValueError, OSError) as err:
        raise ConfigError(setting, data_cfg.hub_name or list(data_cfg.paths),
                          f"could not be streamed: {first_line(err, with_type=True)}") from err
    if batch:
        yield batch
