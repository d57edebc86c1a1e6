"""Which tokenizer a run uses, and the one file every process reads it from.

Resolved once by the driver, after validation and before any actor starts
(:func:`resolve_tokenizer`):

* ``byte``: nothing to resolve, no file;
* a ``tokenizer.json`` path (or its directory): that file;
* ``bpe``: trained on the training split here, or loaded from the token cache's store when
  ``moe-prepare-data`` (or an earlier run) trained it (:mod:`moe_trainer.data.bpe`);
* a resume: the checkpoint's own ``tokenizer.json``; a setting that disagrees with it is refused,
  since the checkpoint's embedding rows mean that tokenizer's ids and no other's.

:func:`install_tokenizer` then writes it to ``RUN_DIR/tokenizer.json`` and points
``data.tokenizer`` at that copy, so actors (and actors rebuilt after a failure, when the
checkpoint it came from may be pruned) load exactly it and never train. Every checkpoint gets
a copy through :func:`saving_tokenizer`, a wrapper of the shard writer: the checkpoint's
``meta.json`` checksums cover it like any shard, and the checkpoint format itself is untouched.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moe_trainer.checksums import file_sha256
from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, DataConfig
from moe_trainer.data.tokenizer import BPE, BYTE, ByteTokenizer, Tokenizer, build_tokenizer, describe
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer
from moe_trainer.startup import phase
from moe_trainer.train.checkpoint import META_FILE


def _describe(tokenizer: Tokenizer) -> str:
    return describe(tokenizer.name, tokenizer.vocab_size, tokenizer.digest)


def tokenizer_record(tokenizer: Tokenizer) -> dict[str, Any]:
    """What a checkpoint's ``meta.json`` says about its tokenizer (the file itself sits beside it)."""
    return {"name": tokenizer.name, "vocab_size": tokenizer.vocab_size, "sha256": tokenizer.digest}


def saving_tokenizer(write_shards: Callable[[Path], object], tokenizer: Tokenizer) -> Callable[[Path], None]:
    """Wraps a checkpoint's shard writer so that the checkpoint also holds the run's ``tokenizer.json``.

    Written into the same temporary directory before ``meta.json`` is made, so the checksums
    cover it; the byte tokenizer has no file and adds nothing.
    """
    def write(directory: Path) -> None:
        write_shards(directory)
        if isinstance(tokenizer, FileTokenizer):
            tokenizer.save(directory / TOKENIZER_FILE)

    return write


def _checkpoint_tokenizer(checkpoint: Path) -> FileTokenizer | None:
    """The checkpoint's tokenizer; None when it has no file (the byte tokenizer)."""
    file = checkpoint / TOKENIZER_FILE
    return FileTokenizer.from_file(file, "train.resume") if file.is_file() else None


def _refuse_altered(checkpoint: Path, saved: FileTokenizer) -> None:
    """Refuses a checkpoint whose tokenizer.json is not the one its ``meta.json`` checksummed.

    Checked here, before actors start, rather than only by the full check when the engine
    loads: a tokenizer.json edited in place would otherwise size the model first.
    """
    try:
        want = json.loads((checkpoint / META_FILE).read_text())["files"][TOKENIZER_FILE]["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # the full check (engine.load) says what is wrong with the metadata
    if want != saved.digest:
        raise ConfigError("train.resume", str(checkpoint), f"its {TOKENIZER_FILE} does not match its checksum "
                          "(altered or corrupt); give another checkpoint or start a new run")


def checkpoint_tokenizer(data: DataConfig, checkpoint: Path, verify: bool = False) -> Tokenizer:
    """The checkpoint's tokenizer, when ``data.tokenizer`` (and ``data.vocab_size``) agree with it.

    Also called by the launch gate, before Hydra writes into the run directory, so a resume
    refused for its tokenizer leaves an existing run directory as it was. ``verify``: first
    refuse a tokenizer.json altered since it was saved (the gate leaves damaged checkpoints to
    ``train.resume=auto``, which skips them).
    """
    from moe_trainer.data.bpe import bpe_vocab_size

    saved = _checkpoint_tokenizer(checkpoint)
    if verify and saved is not None:
        _refuse_altered(checkpoint, saved)
    fresh = "or start a new run without train.resume"
    if saved is None:
        if data.tokenizer != BYTE:
            raise ConfigError("data.tokenizer", data.tokenizer, f"checkpoint {checkpoint} was trained with the byte "
                              f"tokenizer (it holds no {TOKENIZER_FILE}); resume with data.tokenizer=byte, {fresh}")
        return ByteTokenizer()
    use = f"resume with data.tokenizer={checkpoint / TOKENIZER_FILE} (the checkpoint's own), {fresh}"
    if data.tokenizer == BYTE:
        raise ConfigError("data.tokenizer", BYTE, f"checkpoint {checkpoint} was trained with its own "
                          f"{TOKENIZER_FILE} ({_describe(saved)}), not the byte tokenizer; {use}")
    if data.tokenizer == BPE:
        want = bpe_vocab_size(data.vocab_size)
        # a trained BPE has at most the ids asked for (fewer when the corpus runs out of merges),
        # so only one with more ids was certainly trained with another data.vocab_size
        if saved.vocab_size > want:
            raise ConfigError("data.vocab_size", data.vocab_size, f"this run's BPE would have {want} ids, but "
                              f"checkpoint {checkpoint} was trained with a tokenizer of {saved.vocab_size} "
                              f"({_describe(saved)}); resume with data.vocab_size={saved.vocab_size}, {fresh}")
        return saved  # never retrained: the checkpoint's embedding rows are this file's ids
    given = build_tokenizer(data.tokenizer)
    if given.digest != saved.digest:
        raise ConfigError("data.tokenizer", data.tokenizer, f"is {_describe(given)}, but checkpoint {checkpoint} was "
                          f"trained with {_describe(saved)}; {use}")
    return saved


def _bpe(data: DataConfig) -> FileTokenizer:
    """The run's BPE: from the token cache's store when there is one (trained there on first use), else trained."""
    from moe_trainer.data.bpe import bpe_vocab_size, stored_bpe, train_bpe
    from moe_trainer.data.sources import corpus_source, load_corpus

    vocab = bpe_vocab_size(data.vocab_size)
    if data.token_cache:  # found by the corpus's identity: loaded only when it must be trained
        tokenizer, path, trained = stored_bpe(corpus_source(data), vocab, data.token_cache)
        phase(f"{'trained' if trained else 'loaded'} the BPE tokenizer ({_describe(tokenizer)}): {path}")
        return tokenizer
    phase(f"training a BPE tokenizer of {vocab} ids on the training split")
    return train_bpe(load_corpus(data)["train"], vocab)


def resolve_tokenizer(cfg: Config, checkpoint: Path | None) -> Tokenizer:
    """The tokenizer the run uses: the checkpoint's when resuming, else the one ``data.tokenizer`` names.

    Raises :class:`ConfigError` (before anything is written) when a resumed checkpoint's
    tokenizer disagrees with the settings.
    """
    if checkpoint is not None:
        return checkpoint_tokenizer(cfg.data, checkpoint, verify=True)
    if cfg.data.tokenizer == BPE:
        return _bpe(cfg.data)
    return build_tokenizer(cfg.data.tokenizer)


@dataclass
class InstalledTokenizer:
    """The config every process gets (``data.tokenizer`` = the run's file), and what installing created."""

    cfg: Config
    created: list[Path] = field(default_factory=list)  # innermost first: the file, then new directories

    def discard(self) -> None:
        """Removes what installing created: a start refused later leaves the run directory as it found it."""
        for path in self.created:
            if path.is_dir():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)


def install_tokenizer(cfg: Config, tokenizer: Tokenizer, run_dir: Path) -> InstalledTokenizer:
    """Writes a file tokenizer to ``RUN_DIR/tokenizer.json`` and returns the config pointing at it.

    The byte tokenizer is left as it is. A run directory that already holds another
    tokenizer.json (another run's) is refused rather than overwritten: its checkpoints need it.
    """
    if not isinstance(tokenizer, FileTokenizer):
        return InstalledTokenizer(cfg)
    file = run_dir.absolute() / TOKENIZER_FILE
    # a config valid on its own: data.vocab_size only sizes a BPE still to be trained
    pointed = replace(cfg, data=replace(cfg.data, tokenizer=str(file), vocab_size=None))
    if file.is_file():
        if file_sha256(file) != tokenizer.digest:
            raise ConfigError("data.tokenizer", cfg.data.tokenizer, f"the run directory {run_dir} already holds "
                              f"another {TOKENIZER_FILE} (a run with another tokenizer, whose checkpoints need it); "
                              f"train into a new run directory, or resume that run with train.resume=auto")
        return InstalledTokenizer(pointed)
    missing = [p for p in (file.parent, *file.parent.parents) if not p.exists()]
    file.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(file)
    return InstalledTokenizer(pointed, [file, *missing])
