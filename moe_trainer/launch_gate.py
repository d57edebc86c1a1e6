"""Checks ``train.resume`` before Hydra creates or writes the run directory.

Hydra writes ``.hydra/config.yaml``, ``hydra.yaml``, ``overrides.yaml`` and the job's
``.log`` into the run directory before it calls ``moe-train``'s task function, so a
check there is too late for a rerun of a finished run, which must leave its directory
byte-for-byte as it was. A Hydra callback's ``on_run_start`` runs after the config is
composed and before any of that; it is registered in ``conf/config.yaml``
(``hydra.callbacks.launch_gate``).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, NoReturn

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.data.shards import refuse_corrupted_cache
from moe_trainer.data.tokenizer import BPE, build_tokenizer
from moe_trainer.train.resume import (
    NothingToDo,
    may_have_nothing_to_do,
    plan_resume,
    require_fixed_run_dir,
    resume_candidate,
)
from moe_trainer.train.run_tokenizer import checkpoint_tokenizer


def exit_invalid(err: ConfigError) -> NoReturn:
    """The one line every configuration error gets, and exit code 2."""
    print(f"moe-train: invalid setting: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


def report_nothing_to_do(err: NothingToDo) -> None:
    """A rerun with no step left: one line, and (the caller's part) exit code 0."""
    print(f"moe-train: {err}", flush=True)


def _raw(config: DictConfig, key: str) -> str:
    """A setting as written, interpolations unresolved (``outputs/${now:%Y-%m-%d}/...``)."""
    parent, _, leaf = key.rpartition(".")
    return str(OmegaConf.to_container(OmegaConf.select(config, parent), resolve=False)[leaf])  # type: ignore[index]


def _task_config(config: DictConfig) -> DictConfig:
    """The config the task function gets: Hydra's own node removed (as ``run_job`` does)."""
    task = copy.deepcopy(config)
    with open_dict(task):
        del task["hydra"]
    return task


def check_start(config: DictConfig, run_dir_key: str, job_dir_known: bool) -> None:
    """Raises :class:`ConfigError` for any wrong setting of a single run (so a refused start never
    rewrites an existing run directory's ``.hydra/`` files), for ``resume=auto`` in a timestamped
    run directory, for a tokenizer the checkpoint to resume was not trained with and for damaged
    token shards of the run's corpus, and
    :class:`NothingToDo` when the checkpoint to resume is done. Damaged checkpoints that ``auto``
    skips are reported once, by ``train``, not here.

    ``job_dir_known``: ``run_dir_key`` is the job's own directory (a run, not a sweep's root).
    """
    task = to_dataclass(_task_config(config)) if job_dir_known else None
    if task is not None:  # a single run: every setting checked before Hydra writes into its directory
        validate(task)
        if task.data.tokenizer != BPE:  # a BPE is resolved (maybe trained) by the run itself
            refuse_corrupted_cache(task.data, build_tokenizer(task.data.tokenizer))
    resume = OmegaConf.select(config, "train.resume")
    if resume is None:
        return
    require_fixed_run_dir(resume, run_dir_key, _raw(config, run_dir_key))
    if task is None:
        return
    run_dir = Path(str(OmegaConf.select(config, run_dir_key))).absolute()
    max_steps = int(OmegaConf.select(config, "train.max_steps"))
    if may_have_nothing_to_do(resume, max_steps, run_dir):
        plan_resume(resume, max_steps, run_dir, warn=False)
    candidate = resume_candidate(resume, run_dir)
    if candidate is not None:  # a tokenizer the checkpoint disagrees with: refused before Hydra writes
        checkpoint_tokenizer(task.data, candidate)


class LaunchGate(Callback):
    """Refuses or ends a start that must not touch the run directory, before Hydra writes to it."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.run.dir", job_dir_known=True)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir", job_dir_known=False)  # each job's dir is known only later

    @staticmethod
    def _check(config: DictConfig, run_dir_key: str, job_dir_known: bool) -> None:
        try:
            check_start(config, run_dir_key, job_dir_known)
        except ConfigError as err:
            exit_invalid(err)
        except NothingToDo as err:
            report_nothing_to_do(err)
            sys.exit(0)
