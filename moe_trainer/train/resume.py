"""Where a run starts: from scratch, from a checkpoint, or not at all.

Decided once, before anything is written, by both the Hydra launch gate
(:mod:`moe_trainer.launch_gate`, which runs before Hydra creates the run directory)
and :func:`moe_trainer.cli.train`, so a rerun of a finished run cannot touch its files
and a resumed run always knows, and says, which step and run it continues.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.config.errors import ConfigError
from moe_trainer.train.checkpoint import META_FILE, list_checkpoints, refuse_damaged, resolve_resume

# a Hydra run directory made of this resolver is a new directory at every start
_TIMESTAMPED = "${now:"


class NothingToDo(Exception):
    """The checkpoint to resume is already at (or past) ``train.max_steps``: no step is left to run."""


@dataclass(frozen=True)
class ResumePoint:
    """A checkpoint a run continues from, with the step it holds and the run directory it belongs to."""

    checkpoint: Path
    step: int

    @property
    def run_dir(self) -> Path:
        """The run directory the checkpoint was saved in (``RUN_DIR/checkpoints/step_*``), else its own folder."""
        parent = self.checkpoint.parent
        return parent.parent if parent.name == "checkpoints" else parent

    def line(self) -> str:
        """The console line: where the run continues from."""
        return f"resumed from step {self.step} of {self.run_dir} ({self.checkpoint.name})"

    def event(self) -> dict[str, Any]:
        """The ``metrics.jsonl`` / W&B record of the resume (``resumed_from_step`` is the W&B scalar)."""
        return {"step": self.step, "event": "resumed", "resumed_from_step": self.step,
                "resumed_from": str(self.checkpoint)}


def checkpoint_step(path: Path) -> int:
    """The optimizer step a checkpoint holds, from its ``meta.json``."""
    try:
        step = json.loads((path / META_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError("train.resume", str(path), f"checkpoint metadata is unreadable ({err!r}); give another "
                          "step_* directory or start a new run without train.resume") from err
    if not isinstance(step, int) or step < 0:
        raise ConfigError("train.resume", str(path), f"checkpoint metadata holds step {step!r}, not a step count")
    return step


def plan_resume(resume: str | None, max_steps: int, run_dir: Path, warn: bool = True) -> ResumePoint | None:
    """The checkpoint ``train.resume`` names, or None to start at step 0.

    Raises :class:`NothingToDo` when that checkpoint is at ``max_steps`` or beyond (a rerun of a
    finished run), and :class:`ConfigError` when ``train.resume`` names no checkpoint. ``warn``: as in
    :func:`~moe_trainer.train.checkpoint.resolve_resume`.
    """
    found = resolve_resume(resume, run_dir, warn)
    if found is None:
        return None
    point = ResumePoint(found.absolute(), checkpoint_step(found))
    if point.step >= max_steps:
        refuse_damaged(found)  # a damaged one is not "done": say what is wrong with it
        raise NothingToDo(f"nothing to do: {point.run_dir} is at step {point.step}, train.max_steps={max_steps}; "
                          "nothing was changed (raise train.max_steps to train further)")
    return point


def may_have_nothing_to_do(resume: str | None, max_steps: int, run_dir: Path) -> bool:
    """Whether :func:`plan_resume` could raise :class:`NothingToDo`, read from ``meta.json`` alone.

    For ``auto`` the newest checkpoint's step bounds every candidate's: below ``max_steps`` the
    start has work whichever intact one ``auto`` picks, so the caller can skip ``plan_resume``
    and the hashing of every checkpoint file it does (which the start itself does again).
    """
    if resume != "auto":
        return resume is not None  # a named checkpoint: plan_resume hashes only one already done
    newest = list_checkpoints(run_dir / "checkpoints")[-1:]
    try:
        return bool(newest) and checkpoint_step(newest[0]) >= max_steps
    except ConfigError:  # unreadable metadata: let plan_resume judge it
        return True


def resume_candidate(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``train.resume`` most likely names, found without hashing any file.

    For ``auto`` the newest one (a damaged newest is skipped later, but every checkpoint of a
    run directory shares its settings and tokenizer, so the newest stands for all); for a path,
    the one it names. For checks of settings before Hydra writes (the launch gate).
    """
    if resume == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    return resolve_resume(resume, run_dir, warn=False)


def require_fixed_run_dir(resume: str | None, run_dir_setting: str, pattern: str) -> None:
    """Refuses ``train.resume=auto`` when the run directory is new at every start (a ``${now:...}`` path).

    ``auto`` looks for checkpoints in the run directory of this start; a timestamped one never
    has any, so the run would silently begin again at step 0 somewhere else.
    """
    if resume == "auto" and _TIMESTAMPED in pattern:
        raise ConfigError("train.resume", "auto", f"needs a fixed run directory, but {run_dir_setting}={pattern} "
                          f"is a new directory at every start, so there is no checkpoint to resume; add "
                          f"{run_dir_setting}=DIR (the run to continue), or give train.resume=RUN_DIR")
