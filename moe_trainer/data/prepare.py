"""``moe-prepare-data [--cache DIR] [OVERRIDES...]``: fill the token cache before training.

The first training start would write the cache too, but then every actor of the run waits for
it; preparing ahead moves that wait out of the run (and out of the Ray actors' start-up
timeouts). The overrides are ``moe-train``'s own (``data=files 'data.paths=[...]'``), composed
from the same Hydra configs, so the cache key is the one training will look up.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate_data

PROG = "moe-prepare-data"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenise the configured corpus once into memory-mapped token shards (data.token_cache), "
                    "so training starts map them instead of tokenising.",
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE",
                        help="moe-train config overrides, e.g. data=files 'data.paths=[/data/*.txt]'")
    parser.add_argument("--cache", default=None, metavar="DIR",
                        help="cache directory (default: data.token_cache, else ~/.cache/moe-trainer/tokens)")
    return parser


def prepare(overrides: Sequence[str], cache: str | None = None) -> str:
    """Fills the token cache for the config `overrides` compose; returns the lines to print."""
    from moe_trainer.cli import compose_config  # the Hydra configs moe-train composes
    from moe_trainer.config.schema import default_token_cache
    from moe_trainer.data.bpe import bpe_vocab_size, stored_bpe
    from moe_trainer.data.shards import build_token_cache, refuse_corrupted_cache, refuse_shard_directory
    from moe_trainer.data.sources import corpus_source
    from moe_trainer.data.tokenizer import BPE, build_tokenizer, describe

    cfg = to_dataclass(compose_config(list(overrides)))
    validate_data(cfg)
    root = cache or cfg.data.token_cache or default_token_cache()
    if cache is not None:
        refuse_shard_directory(Path(cache), None)
    source = corpus_source(cfg.data)
    lines = []
    if cfg.data.tokenizer == BPE:  # trained once here; moe-train with data.token_cache=ROOT loads this file
        tokenizer, path, trained = stored_bpe(source, bpe_vocab_size(cfg.data.vocab_size), root)
        lines.append(f"{'trained' if trained else 'already trained:'} {path}")
    else:
        tokenizer = build_tokenizer(cfg.data.tokenizer)
    refuse_corrupted_cache(dataclasses.replace(cfg.data, token_cache=str(root)), tokenizer)  # never "already there"
    directory, index, written = build_token_cache(source, tokenizer, root, cfg.data.tokenize_procs)
    counts = ", ".join(f"{split} {n:,}" for split, n in index.tokens.items())
    lines += [f"{'wrote' if written else 'already there, nothing to do:'} {directory}",
              f"tokens: {counts} ({index.dtype}, tokenizer "
              f"{describe(index.tokenizer, index.vocab_size, index.tokenizer_sha256)})"]
    if cfg.data.token_cache is None or cache not in (None, cfg.data.token_cache):
        lines.append(f"train on it with: data.token_cache={root}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point: a config error is one line and exit code 2."""
    args = _parser().parse_args(argv)
    try:
        print(prepare(args.overrides, args.cache), flush=True)
    except ConfigError as err:
        print(f"{PROG}: invalid setting: {err}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
