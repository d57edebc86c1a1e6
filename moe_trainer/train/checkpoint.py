"""Checkpoint directories: one per step, written atomically, checked before loading.

A checkpoint is ``step_XXXXXXXX/{.metadata, __<rank>_0.distcp, ..., meta.json}``, first
written under a temporary name and renamed into place once every file is written, so a
crash mid-save (or mid background save) never leaves a half-written checkpoint where
``resume`` would look. ``meta.json`` records the size and SHA-256 of every other file in
the directory, whoever wrote it. What goes in the files is
:mod:`moe_trainer.train.sharded_checkpoint`'s and :mod:`moe_trainer.train.checkpoint_io`'s
business.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.checksums import file_sha256
from moe_trainer.config.errors import ConfigError
from moe_trainer.train.safe_metadata import METADATA_FILE as METADATA_FILE_DCP
from moe_trainer.train.safe_metadata import load_metadata

META_FILE = "meta.json"
# objective settings recorded only since a later version: the value a checkpoint without them was trained with
OBJECTIVE_DEFAULTS: dict[str, Any] = {"train.grad_accum_steps": 1}
# a model=dense checkpoint's FFN width in its "experts" signature: absent before 2026-12-04, when the width
# left the router out (k * moe.expert_hidden + shared), so such a checkpoint is refused by name, not by a shape
DENSE_WIDTH_KEY = "dense_ffn_hidden"


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:08d}"


@dataclass
class PendingCheckpoint:
    """A checkpoint being written into its temporary directory; final only after :meth:`complete`."""

    tmp: Path
    final: Path
    step: int
    meta: dict[str, Any]

    def complete(self) -> Path:
        """Records every file's size and checksum in ``meta.json``, then renames the directory into place.

        Call only once every writer has finished: the rename is what makes the checkpoint exist.
        """
        files = {str(f.relative_to(self.tmp)): {"bytes": f.stat().st_size, "sha256": file_sha256(f)}
                 for f in sorted(self.tmp.rglob("*")) if f.is_file()}
        (self.tmp / META_FILE).write_text(json.dumps({"step": self.step, "files": files, **self.meta}, indent=1))
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return self.final

    def abandon(self) -> None:
        """Deletes what was written (a save whose writers died): it never becomes a checkpoint."""
        shutil.rmtree(self.tmp, ignore_errors=True)


def begin_checkpoint(root: Path, step: int, meta: dict[str, Any]) -> PendingCheckpoint:
    """An empty temporary directory for the checkpoint of ``step`` (a stale one of this process is cleared)."""
    final = checkpoint_dir(root, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return PendingCheckpoint(tmp, final, step, meta)


@dataclass
class BackgroundSave:
    """A checkpoint whose files are being written while training goes on (``train.async_checkpoint``)."""

    pending: PendingCheckpoint
    wait: Callable[[], None]  # returns once every writer has finished; raises if one failed

    def finish(self) -> Path:
        """Waits for every writer, then completes the checkpoint; a failed save is deleted and re-raised."""
        try:
            self.wait()
        except BaseException:
            self.pending.abandon()
            raise
        return self.pending.complete()


def save_checkpoint(root: Path, step: int, write_shards: Callable[[Path], None], meta: dict[str, Any]) -> Path:
    """Has ``write_shards`` fill a temporary directory, adds ``meta.json``, renames it into place."""
    pending = begin_checkpoint(root, step, meta)
    write_shards(pending.tmp)
    return pending.complete()


def checkpoint_problems(path: Path) -> list[str]:
    """What is wrong with a checkpoint directory (missing, truncated or altered files); empty when intact."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        return [f"{META_FILE} unreadable ({err})"]
    files = meta.get("files")
    if not isinstance(files, dict) or not files:
        return [f"{META_FILE} lists no shard files (not a checkpoint of this trainer?)"]
    problems = []
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            problems.append(f"{name} is missing")
        elif f.stat().st_size != want.get("bytes"):
            problems.append(f"{name} has {f.stat().st_size} bytes, {want.get('bytes')} were written (truncated?)")
        elif file_sha256(f) != want.get("sha256"):
            problems.append(f"{name} does not match its checksum (altered or corrupt)")
    return problems


def prune_checkpoints(root: Path, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` complete checkpoints (0 keeps everything)."""
    if keep_last > 0:
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step_*") if (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def resolve_resume(resume: str | None, run_dir: Path, warn: bool = True) -> Path | None:
    """Maps ``train.resume`` (null | auto | a checkpoint or run directory) to a checkpoint directory.

    ``warn``: say on stderr which damaged checkpoints ``auto`` skipped (once per start, not per look).
    """
    if resume is None:
        return None
    if resume == "auto":
        for candidate in reversed(list_checkpoints(run_dir / "checkpoints")):
            problems = checkpoint_problems(candidate)
            if not problems:
                return candidate
            if warn:
                print(f"moe-train: skipping damaged checkpoint {candidate}: {'; '.join(problems)}", file=sys.stderr)
        return None
    path = Path(resume).expanduser()
    if (path / META_FILE).is_file():
        return path
    for root in (path / "checkpoints", path):
        found = list_checkpoints(root)
        if found:
            return found[-1]
    raise ConfigError("train.resume", resume, "no checkpoint there; give a step_* directory, a run directory "
                      "holding checkpoints/, or 'auto'")


def refuse_damaged(path: Path) -> None:
    """Raises :class:`ConfigError` naming ``train.resume`` when the checkpoint's files are missing or altered."""
    problems = checkpoint_problems(path)
    if problems:
        raise ConfigError("train.resume", str(path), f"checkpoint is damaged: {'; '.join(problems)}")


def check_checkpoint(path: Path, expected_meta: dict[str, Any]) -> None:
    """Refuses a damaged checkpoint, or one made by a model of another shape (layout and strategy may differ).

    A DCP index (``.metadata``) is read here too, through the restricted unpickler: a foreign one is
    refused in this process, before any rank (a Ray actor) opens the checkpoint.
    """
    refuse_damaged(path)
    if (path / METADATA_FILE_DCP).exists():
        load_metadata(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ConfigError("train.resume", str(path), f"checkpoint metadata is unreadable ({err})") from err
    width = expected_meta.get("experts", {}).get(DENSE_WIDTH_KEY)
    if width is not None and DENSE_WIDTH_KEY not in meta.get("experts", {}):
        raise ConfigError("train.resume", str(path), "a model=dense checkpoint from before 2026-12-04, when "
                          "model=dense left the router out of its FFN width (this run's is "
                          f"{width}, router included): export it (moe-export) and start a run from the export "
                          "(moe-import prints its settings)")
    objective = expected_meta.get("objective", {})
    for key, want in expected_meta.items():
        if key != "objective" and meta.get(key) != want:
            raise ConfigError("train.resume", str(path),
                              f"checkpoint was saved with {key}={meta.get(key)!r}, this run has {want!r}")
    if objective and "objective" not in meta:
        raise ConfigError("train.resume", str(path), "checkpoint predates recorded training objectives (its routing "
                          "groups followed the layout it was trained with), so it cannot be resumed as the same "
                          "objective; start a new run")
    for setting, want in objective.items():  # name the setting, so the user knows what to change
        saved = meta["objective"].get(setting, OBJECTIVE_DEFAULTS.get(setting))
        if saved != want:
            raise ConfigError(setting, want, f"checkpoint {path} was trained with {setting}={saved!r} (effective "
                              "value under its layout), a different objective; resume with that value (or start "
                              "a new run without train.resume)")
