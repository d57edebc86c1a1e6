"""What a non-finite step does: the chunk loop every engine runs, and the finiteness check before a save.

A step whose global gradient norm is NaN or infinite is never applied
(``step_skipped``). The norm is all-reduced, so every rank sees the same flags,
and :class:`SkipPolicy` fed with them makes the same decision on every rank and
in the driver: with ``train.on_nan=stop`` the chunk ends right after the first
skipped step, with ``skip`` after ``train.max_skipped_steps`` skipped in a row.
Stopping inside the chunk (not after it) keeps later steps from running on a
model that has already gone bad, and keeps all ranks at the same step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_trainer.config.schema import TrainConfig


@dataclass
class SkipPolicy:
    """Counts skipped steps and says when training must end (``train.on_nan``, ``train.max_skipped_steps``)."""

    on_nan: str  # stop | skip
    max_skipped: int  # with skip: stop after this many skipped steps in a row
    consecutive: int = 0  # skipped steps in a row so far

    @classmethod
    def from_config(cls, t: TrainConfig) -> SkipPolicy:
        return cls(t.on_nan, t.max_skipped_steps)

    def must_stop(self, record: dict[str, Any]) -> bool:
        """Counts the step of ``record``; True when no further step may run after it."""
        if not record.get("step_skipped"):
            self.consecutive = 0
            return False
        self.consecutive += 1
        return self.on_nan == "stop" or self.consecutive >= self.max_skipped


def run_steps(train_step: Callable[[], dict[str, Any]], num_steps: int, policy: SkipPolicy,
              stop: Callable[[], bool] | None = None) -> list[dict[str, Any]]:
    """Runs up to ``num_steps`` steps; ends right after the step ``policy`` stops at, or after
    a step at whose end ``stop()`` says so (a preemption, see :mod:`moe_trainer.preemption`).

    Every engine's chunk loop (the local engine, each Ray rank, each expert actor) is this
    function, so all ranks leave the chunk after the same step and no collective is left
    waiting for a rank that stopped: on several ranks ``stop`` is a collective agreement
    (:func:`moe_trainer.parallel.comm.agreed_flag`) that every rank calls after every step.
    """
    records: list[dict[str, Any]] = []
    for _ in range(num_steps):
        records.append(train_step())
        if policy.must_stop(records[-1]):
            break
        if stop is not None and stop():
            break
    return records


def nonfinite_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters, buffers and optimizer state tensors holding NaN or inf (empty when finite).

    Checked before every save: a non-finite state must never become the newest checkpoint,
    which ``train.resume=auto`` would pick and ``train.keep_last`` would keep instead of
    the good ones.
    """
    bad = [f"model/{name}" for name, t in model.state_dict().items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    names = {id(p): name for name, p in model.named_parameters()}
    for param, state in optimizer.state.items():
        for field, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad.append(f"optim.{field}/{names.get(id(param), '?')}")
    return bad
