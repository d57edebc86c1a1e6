"""AdamW with decoupled weight decay on matrices only, and a warmup + cosine schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from moe_trainer.config.schema import MoEConfig, TrainConfig
from moe_trainer.moe.experts import is_expert_param
from moe_trainer.moe.router import is_router_param


def _role(name: str) -> str:
    """Which learning-rate group parameter ``name`` belongs to: ``experts``, ``router`` or ``base``."""
    return "experts" if is_expert_param(name) else "router" if is_router_param(name) else "base"


def build_optimizer(model: nn.Module, cfg: TrainConfig, owns: Callable[[str], bool] | None = None
                    ) -> torch.optim.AdamW:
    """Decays weight matrices (and stacked expert matrices); never norms or 1-D tensors.

    ``fused=True``: one elementwise kernel per tensor, the same arithmetic for every element
    whatever the tensor's size, so a shard of experts gets the update those experts get in the
    unsharded model; and it is ~9x faster than the per-tensor loop on CPU at 50M parameters
    (benchmarks/expert_scaling.py), which is what keeps many-expert steps cheap.
    ``owns``: the parameters (by name) whose state this rank keeps under ``parallel.shard_optimizer``
    (:mod:`moe_trainer.parallel.zero`); the others get no state and no update here. A group may be empty.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad and (owns is None or owns(name))]
    # ``train.expert_lr_scale`` and ``train.router_lr_scale``: groups of their own, whose learning rate
    # set_lr scales. The groups follow from the config alone (one may be empty), so every rank has the same.
    scales = {"base": 1.0, "experts": cfg.expert_lr_scale, "router": cfg.router_lr_scale}
    roles = [role for role, scale in scales.items() if role == "base" or scale != 1.0]
    parts: dict[str, list[nn.Parameter]] = {role: [] for role in roles}
    for name, p in named:
        role = _role(name)
        parts[role if role in parts else "base"].append(p)
    groups = []
    for role in roles:
        groups += [{"params": [p for p in parts[role] if p.dim() >= 2], "weight_decay": cfg.weight_decay,
                    "lr_scale": scales[role]},
                   {"params": [p for p in parts[role] if p.dim() < 2], "weight_decay": 0.0, "lr_scale": scales[role]}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)


def clipped_step(optimizer: torch.optim.Optimizer, total_norm: Tensor, max_norm: float) -> None:
    """One optimizer step on the gradients clipped to global norm ``max_norm`` (0: no clipping).

    The clip is folded into the fused AdamW kernel through ``optimizer.grad_scale``, the
    hook ``torch.amp.GradScaler`` uses: the kernel divides each gradient by it as it reads
    it (and writes the clipped gradient back), so clipping costs no separate pass over all
    gradients (at 128 experts that pass was 5 ms of a 260 ms step, benchmarks/expert_scaling.py).
    """
    if max_norm <= 0:
        optimizer.step()
        return
    coef = torch.clamp(max_norm / (total_norm.float() + 1e-6), max=1.0)
    if not getattr(optimizer, "_step_supports_amp_scaling", False):  # not fused: scale the gradients
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(coef.to(p.grad.dtype))
        optimizer.step()
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params:  # a rank that owns no optimizer state (parallel.shard_optimizer): nothing to update
        return
    device = params[0].device
    optimizer.grad_scale = (1.0 / coef).to(device)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def apply_update(optimizer: torch.optim.Optimizer, grad_norm: Tensor, max_norm: float) -> bool:
    """The update every rank of every strategy takes: clipped AdamW when the global norm is finite, else none.

    The norm is global (every rank computes the same value), so every rank, coordinator or
    expert actor, makes the same choice. Returns whether the update was applied.
    """
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        clipped_step(optimizer, grad_norm, max_norm)
    return finite


def optimizer_state_mb(optimizer: torch.optim.Optimizer, names: dict[int, str]) -> tuple[float, float]:
    """``(all, dense)`` MiB of the state tensors ``optimizer`` holds (moments and step counters).

    ``names``: parameter id -> name, which tells expert parameters from dense ones. Sizes only,
    never values: no device sync. Zero before the first step (AdamW creates its state lazily).
    """
    total = dense = 0
    for param, state in optimizer.state.items():
        size = sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
        total += size
        dense += 0 if is_expert_param(names.get(id(param), "")) else size
    return total / 2**20, dense / 2**20


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warmup, then cosine down to ``min_lr_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def bias_rate_factor(step: int, moe: MoEConfig, cfg: TrainConfig) -> float:
    """Multiplier of ``moe.bias_update_rate`` at ``step``: 1, or with ``moe.bias_update_schedule=lr`` the
    learning rate's cosine decay after warmup (not its warmup: the early routing is the most unbalanced).

    The argument for it: the router's weights move at the learning rate, and a bias that keeps its full
    step while they slow down jitters around its target. Measured (docs/moe-study.md, sixth session) it
    balanced worse in every layer than the constant rate: the router still moves late, and the bias must
    keep up. Kept as a setting for that comparison; the default is ``constant``.
    """
    if moe.bias_update_schedule == "constant" or step < cfg.warmup_steps:
        return 1.0
    return lr_factor(step, cfg)


def set_lr(optimizer: torch.optim.Optimizer, step: int, cfg: TrainConfig) -> float:
    """Sets the learning rate for ``step`` from the step alone, so resuming needs no scheduler state.

    Returns the base rate (``train.lr``'s); the experts' and routers' groups get it times their ``lr_scale``.
    """
    lr = cfg.lr * lr_factor(step, cfg)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
