"""Checkpoint contents keyed by parameter name and *global* expert index, so layouts can change.

Stacked expert tensors ``[E_local, ...]`` are stored one expert at a time
(``model/blocks.0.ffn.experts.w_down_EFD/expert5``), with their AdamW moments
beside them. Every process writes only what it owns (dense state: rank 0;
experts: the ranks of the first expert-parallel group; with ``parallel.shard_optimizer``
the optimizer entries of a parameter: the rank holding its state), and a loader picks
the entries its own layout needs, so a run saved with 4 expert-parallel ranks loads
into 2, into ``data_parallel`` or into ``single``, sharded or not: the keys are the same.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_trainer.config.errors import ConfigError
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.train.trainer import Trainer

# ``Trainer`` here means anything with ``model``, ``optimizer``, ``step``, ``tokens_seen`` and
# ``ctx.device``: the expert actors' ExpertServer is saved and loaded through the same functions.

SHARD_GLOB = "shard_rank*.pt"


def _expert_params(trainer: Trainer) -> dict[str, int]:
    """Name of each stacked expert parameter -> its shard's first global expert."""
    out = {}
    for mod_name, module in trainer.model.named_modules():
        if isinstance(module, SwiGLUExperts):
            for pname, _ in module.named_parameters():
                out[f"{mod_name}.{pname}"] = module.first_expert
    return out


def _param_names(trainer: Trainer) -> list[str]:
    """Parameter names in the optimizer's index order."""
    by_id = {id(p): n for n, p in trainer.model.named_parameters()}
    return [by_id[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]


def _put(out: dict[str, Tensor], prefix: str, name: str, tensor: Tensor, expert_first: dict[str, int],
         dense: bool, experts: bool) -> None:
    """Adds ``tensor`` under its canonical key: stacked expert tensors one global expert at a time."""
    if name in expert_first:
        if experts:
            for e in range(tensor.shape[0]):
                out[f"{prefix}/{name}/expert{expert_first[name] + e}"] = tensor[e].detach().cpu().clone()
    elif dense:
        out[f"{prefix}/{name}"] = tensor.detach().cpu().clone()


def canonical_state(trainer: Trainer, dense: bool = True, experts: bool = True,
                    optim_owner: Callable[[str], bool] | None = None) -> dict[str, Tensor]:
    """Flat ``{key: tensor}`` of the parts of model and optimizer this process should write.

    ``optim_owner`` (``parallel.shard_optimizer``): the parameters whose optimizer entries this
    process writes, whatever ``dense`` and ``experts`` say (those then choose the model entries only).
    """
    expert_first = _expert_params(trainer)
    out: dict[str, Tensor] = {}
    for name, tensor in trainer.model.state_dict().items():
        _put(out, "model", name, tensor, expert_first, dense, experts)
    state = trainer.optimizer.state_dict()["state"]
    for index, name in enumerate(_param_names(trainer)):
        opt_dense, opt_experts = (dense, experts) if optim_owner is None else (optim_owner(name),) * 2
        for field, value in state.get(index, {}).items():
            if field == "step":
                if opt_dense or (opt_experts and name in expert_first):
                    out[f"optim/{name}/step"] = value.detach().cpu().clone()
            else:
                _put(out, f"optim.{field}", name, value, expert_first, opt_dense, opt_experts)
    if dense:
        out["trainer/step"] = torch.tensor(trainer.step)
        out["trainer/tokens_seen"] = torch.tensor(trainer.tokens_seen)
    return out


def canonical_grads(trainer: Trainer, dense: bool = True, experts: bool = True) -> dict[str, Tensor]:
    """This process's current gradients under the checkpoint keys (``grad/<name>[/expertN]``).

    Keyed by global expert index like the checkpoint, so gradients of any two layouts can be
    compared entry by entry (what the equivalence tests do).
    """
    expert_first = _expert_params(trainer)
    out: dict[str, Tensor] = {}
    for name, param in trainer.model.named_parameters():
        if param.grad is not None:
            _put(out, "grad", name, param.grad, expert_first, dense, experts)
    return out


def save_shard(directory: Path, trainer: Trainer, rank: int = 0, dense: bool = True, experts: bool = True,
               optim_owner: Callable[[str], bool] | None = None) -> None:
    """Writes the entries this process owns (``dense`` state, its ``experts``, ``optim_owner``'s) into ``directory``."""
    if dense or experts or optim_owner is not None:
        torch.save(canonical_state(trainer, dense, experts, optim_owner), directory / f"shard_rank{rank:05d}.pt")


def read_entries(directory: Path) -> dict[str, Tensor]:
    entries: dict[str, Tensor] = {}
    for shard in sorted(directory.glob(SHARD_GLOB)):
        try:
            entries.update(torch.load(shard, map_location="cpu", weights_only=True))
        except Exception as err:  # torch raises several types for truncated or foreign files
            raise ConfigError("train.resume", str(directory), f"shard {shard.name} is unreadable or corrupt "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if "trainer/step" not in entries:
        raise ConfigError("train.resume", str(directory), "checkpoint has no dense shard (shard_rank00000.pt)")
    return entries


def _take(entries: dict[str, Tensor], prefix: str, name: str, like: Tensor, first: int | None) -> Tensor:
    if first is None:
        key = f"{prefix}/{name}"
        if key not in entries:
            raise ConfigError("train.resume", key, "missing from the checkpoint (saved by a different model?)")
        return entries[key]
    if like.shape[0] == 0:  # a shard without experts (a disaggregated coordinator)
        return like.detach().clone()
    keys = [f"{prefix}/{name}/expert{first + e}" for e in range(like.shape[0])]
    missing = [k for k in keys if k not in entries]
    if missing:
        raise ConfigError("train.resume", missing[0], "missing from the checkpoint (fewer experts than this run?)")
    return torch.stack([entries[k] for k in keys])


def load_into(directory: Path, trainer: Trainer) -> None:
    """Loads the entries this process's layout needs from a checkpoint directory.

    Optimizer entries: those of the parameters ``trainer.optimizer`` holds, which a sharded
    optimizer (``parallel.shard_optimizer``) limits to the ones this rank owns.
    """
    entries = read_entries(directory)
    expert_first = _expert_params(trainer)
    device = trainer.ctx.device
    model_state = {
        name: _take(entries, "model", name, tensor, expert_first.get(name)).to(device)
        for name, tensor in trainer.model.state_dict().items()
    }
    trainer.model.load_state_dict(model_state)
    opt_state = trainer.optimizer.state_dict()
    state: dict[int, dict[str, Any]] = {}
    params = {n: p for n, p in trainer.model.named_parameters()}
    for index, name in enumerate(_param_names(trainer)):
        if f"optim/{name}/step" not in entries:
            continue
        first = expert_first.get(name)
        state[index] = {"step": entries[f"optim/{name}/step"]}
        for field in ("exp_avg", "exp_avg_sq"):
            state[index][field] = _take(entries, f"optim.{field}", name, params[name], first).to(device)
    opt_state["state"] = state
    trainer.optimizer.load_state_dict(opt_state)
    trainer.step = int(entries["trainer/step"])
    trainer.tokens_seen = int(entries["trainer/tokens_seen"])
