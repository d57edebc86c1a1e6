"""Checkpoint contents keyed by parameter name and *global* expert index, so layouts can change.

Stacked expert tensors ``[E_local, ...]`` are stored one expert at a time
(``model/blocks.0.ffn.experts.w_down_EFD/expert5``), with their AdamW moments
beside them. Every process writes only what it owns (dense state: rank 0;
experts: the ranks of the first expert-parallel group; with ``parallel.shard_optimizer``
the optimizer entries of a parameter: the rank holding its state), and a loader reads only
the entries its own layout needs, so a run saved with 4 expert-parallel ranks loads into 2,
into ``data_parallel`` or into ``single``, sharded or not (the keys are the same), and no
rank reads another's experts.
How the entries reach the disk (torch.distributed.checkpoint) is
:mod:`moe_trainer.train.checkpoint_io`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_trainer.config.errors import ConfigError
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.train.checkpoint_io import CheckpointReader, read_entries, write_state
from moe_trainer.train.trainer import Trainer

# ``Trainer`` here means anything with ``model``, ``optimizer``, ``step``, ``tokens_seen`` and
# ``ctx.device``: the expert actors' ExpertServer is saved and loaded through the same functions.

__all__ = ["canonical_grads", "canonical_state", "load_into", "model_entries", "read_entries", "save_shard"]


def expert_shards(model: torch.nn.Module) -> dict[str, int]:
    """Name of each stacked expert parameter -> its shard's first global expert."""
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, SwiGLUExperts):
            for pname, _ in module.named_parameters():
                out[f"{mod_name}.{pname}"] = module.first_expert
    return out


def _param_names(trainer: Trainer) -> list[str]:
    """Parameter names in the optimizer's index order."""
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    return [by_id[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]


def _put(out: dict[str, Tensor], prefix: str, name: str, tensor: Tensor, expert_first: dict[str, int],
         dense: bool, experts: bool, take: Callable[[Tensor], Tensor] = Tensor.detach) -> None:
    """Adds ``take(tensor)`` under its canonical key: stacked expert tensors one global expert at a time (views)."""
    if name in expert_first:
        if experts:
            for e in range(tensor.shape[0]):
                out[f"{prefix}/{name}/expert{expert_first[name] + e}"] = take(tensor[e])
    elif dense:
        out[f"{prefix}/{name}"] = take(tensor)


# What a process writes. Ownership is decided by the caller's ``dense``/``experts`` flags
# (parallel.setup.RankSetup); one function per part, so a change of who owns which part
# (optimizer state sharded over data-parallel ranks) touches one of them.

def _model_entries(model: torch.nn.Module, expert_first: dict[str, int], dense: bool,
                   experts: bool) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for name, tensor in model.state_dict().items():
        _put(out, "model", name, tensor, expert_first, dense, experts)
    return out


def model_entries(model: torch.nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``model``'s state under its checkpoint key without the ``model/`` prefix
    (``blocks.0.ffn.experts.w_down_EFD/expert5``): views, one global expert at a time."""
    entries = _model_entries(model, expert_shards(model), True, True)
    return {key.removeprefix("model/"): tensor for key, tensor in entries.items()}


def _optimizer_entries(trainer: Trainer, expert_first: dict[str, int], dense: bool, experts: bool,
                       optim_owner: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """``optim_owner`` (``parallel.shard_optimizer``): the parameters whose entries this process
    writes, whatever ``dense`` and ``experts`` say (those then choose the model entries only)."""
    out: dict[str, Tensor] = {}
    state = trainer.optimizer.state_dict()["state"]
    for index, name in enumerate(_param_names(trainer)):
        opt_dense, opt_experts = (dense, experts) if optim_owner is None else (optim_owner(name),) * 2
        for field, value in state.get(index, {}).items():
            if field == "step":
                if opt_dense or (opt_experts and name in expert_first):
                    out[f"optim/{name}/step"] = value.detach()
            else:
                _put(out, f"optim.{field}", name, value, expert_first, opt_dense, opt_experts)
    return out


def _trainer_entries(trainer: Trainer, dense: bool) -> dict[str, Tensor]:
    if not dense:
        return {}
    return {"trainer/step": torch.tensor(trainer.step), "trainer/tokens_seen": torch.tensor(trainer.tokens_seen)}


def canonical_state(trainer: Trainer, dense: bool = True, experts: bool = True,
                    optim_owner: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """Flat ``{key: tensor}`` of the parts of model and optimizer this process should write.

    Views of the live tensors, not copies: a save writes them (or, in the background, copies
    them) before training changes them, so saving costs no second copy of the state.
    """
    expert_first = expert_shards(trainer.model)
    return {**_model_entries(trainer.model, expert_first, dense, experts),
            **_optimizer_entries(trainer, expert_first, dense, experts, optim_owner),
            **_trainer_entries(trainer, dense)}


def canonical_grads(trainer: Trainer, dense: bool = True, experts: bool = True) -> dict[str, Tensor]:
    """This process's current gradients under the checkpoint keys (``grad/<name>[/expertN]``).

    Keyed by global expert index like the checkpoint, so gradients of any two layouts can be
    compared entry by entry (what the equivalence tests do).
    """
    expert_first = expert_shards(trainer.model)
    out: dict[str, Tensor] = {}
    for name, param in trainer.model.named_parameters():
        if param.grad is not None:
            _put(out, "grad", name, param.grad, expert_first, dense, experts, take=_host_copy)
    return out


def _host_copy(tensor: Tensor) -> Tensor:
    return tensor.detach().cpu().clone()


def save_shard(directory: Path, trainer: Trainer, group: Any | None = None, dense: bool = True,
               experts: bool = True, background: bool = False,
               optim_owner: Callable[[str], bool] | None = None) -> Callable[[], None]:
    """Writes the entries this process owns (``dense`` state, its ``experts``, ``optim_owner``'s
    optimizer state) into ``directory``.

    A collective over ``group`` (every rank calls it, owning something or not); None: this
    process alone. Returns the function that waits for the writes; ``background``: see
    :func:`~moe_trainer.train.checkpoint_io.write_state`.
    """
    return write_state(directory, canonical_state(trainer, dense, experts, optim_owner), group, background)


# What a process reads: destination tensors for every entry its layout needs, and nothing else.

@dataclass
class _Destinations:
    """Where each needed entry goes: the live model tensors (in place), new AdamW state, the counters."""

    tensors: dict[str, Tensor]
    optimizer_state: dict[int, dict[str, Tensor]]  # optimizer index -> AdamW state, filled by the read
    counters: dict[str, Tensor]


def _model_targets(trainer: Trainer, expert_first: dict[str, int]) -> dict[str, Tensor]:
    """This process's model entries: dense ones and its own experts' (a coordinator's empty shard: none)."""
    return _model_entries(trainer.model, expert_first, dense=True, experts=True)


def _optimizer_targets(trainer: Trainer, expert_first: dict[str, int],
                       saved: dict[str, torch.Size]) -> tuple[dict[str, Tensor], dict[int, dict[str, Tensor]]]:
    """AdamW state for each parameter the checkpoint has state for (none before the first step), as empty buffers.

    Only the parameters this process's optimizer holds: all of its parameters, or under
    ``parallel.shard_optimizer`` the ones it owns, so a rank reads only its own share.
    """
    params = dict(trainer.model.named_parameters())
    out: dict[str, Tensor] = {}
    state: dict[int, dict[str, Tensor]] = {}
    for index, name in enumerate(_param_names(trainer)):
        step_key = f"optim/{name}/step"
        if step_key not in saved:
            continue
        # AdamW's step counter is a float32 scalar (fused); the moments are shaped like the parameter
        step = torch.zeros(saved[step_key], dtype=torch.float32)
        moments = {field: torch.empty_like(params[name]) for field in ("exp_avg", "exp_avg_sq")}
        out[step_key] = step
        for field, buf in moments.items():
            _put(out, f"optim.{field}", name, buf, expert_first, dense=True, experts=True)
        state[index] = {"step": step, **moments}
    return out, state


def _destinations(trainer: Trainer, saved: dict[str, torch.Size]) -> _Destinations:
    expert_first = expert_shards(trainer.model)
    optim, state = _optimizer_targets(trainer, expert_first, saved)
    counters = {"trainer/step": torch.zeros((), dtype=torch.int64),
                "trainer/tokens_seen": torch.zeros((), dtype=torch.int64)}
    return _Destinations({**_model_targets(trainer, expert_first), **optim, **counters}, state, counters)


def _refuse_mismatch(directory: Path, saved: dict[str, torch.Size], wanted: dict[str, Tensor]) -> None:
    """A :class:`ConfigError` naming the first entry this layout needs that the checkpoint lacks or shapes otherwise."""
    for key, tensor in wanted.items():
        if key not in saved:
            raise ConfigError("train.resume", key, f"missing from the checkpoint {directory} (saved by a different "
                              "model, or with fewer experts than this run?)")
        if tuple(saved[key]) != tuple(tensor.shape):
            raise ConfigError("train.resume", key, f"saved with shape {list(saved[key])}, this run needs "
                              f"{list(tensor.shape)} (saved by a different model?)")


def load_into(directory: Path, trainer: Trainer) -> None:
    """Loads the entries this process's layout needs from a checkpoint directory, reading no others.

    Model entries are read straight into the live parameters; AdamW state into new buffers
    that become the optimizer's state, so host memory grows by this process's own
    optimizer state and DCP's read buffer of one entry, not by the checkpoint's size.
    """
    reader = CheckpointReader(directory)
    where = _destinations(trainer, reader.shapes)
    _refuse_mismatch(directory, reader.shapes, where.tensors)
    reader.read_into(where.tensors)
    opt_state = trainer.optimizer.state_dict()
    opt_state["state"] = where.optimizer_state
    trainer.optimizer.load_state_dict(opt_state)  # same dtype and device: takes the buffers as they are
    trainer.step = int(where.counters["trainer/step"])
    trainer.tokens_seen = int(where.counters["trainer/tokens_seen"])
