"""The memory each rank may use, and the refusal of a config whose plan does not fit it.

The budget per rank: ``parallel.memory_per_actor_gb`` when set (GiB, host or device); else on
a GPU the device's memory (``torch.cuda.get_device_properties``, as seen by the driver), and on
the CPU this machine's memory divided by the processes the run starts on it: 1 for
``single``, the actors plus the driver for a Ray strategy on the embedded cluster. A run on an
existing cluster (``cluster.address`` or ``RAY_ADDRESS``) places its actors on machines the
driver cannot see, so only an explicit ``parallel.memory_per_actor_gb`` is checked there.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.fixes import Fix, passing
from moe_trainer.config.schema import Config
from moe_trainer.parallel.topology import world_size
from moe_trainer.plan.memory_plan import MemoryPlan, RankPlan, build_plan, on_gpu

GIB = 2**30
SETTING = "parallel.memory_per_actor_gb"


@dataclass(frozen=True)
class Budget:
    bytes: int
    source: str  # where the number came from, for messages


def _machine_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _remote_cluster(cfg: Config) -> bool:
    return cfg.parallel.strategy != "single" and bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def check_budget_setting(cfg: Config) -> None:
    """A budget of 0 or less is a typo, not a request to refuse everything."""
    value = getattr(cfg.parallel, "memory_per_actor_gb", None)
    if value is not None and value <= 0:
        raise ConfigError(SETTING, value, "must be > 0 (GiB each actor may use), or null: on a GPU its memory, on "
                          "the CPU this machine's memory divided by the processes the run starts on it")


def budget(cfg: Config) -> Budget | None:
    """Bytes each rank may use, or None where the driver cannot know (no setting, an existing cluster)."""
    value = getattr(cfg.parallel, "memory_per_actor_gb", None)
    if value is not None:
        return Budget(int(value * GIB), f"{SETTING}={value:g}")
    if on_gpu(cfg):
        import torch

        try:
            return Budget(torch.cuda.get_device_properties(0).total_memory, "the GPU's memory")
        except (RuntimeError, AssertionError):  # no GPU the driver can query: the ranks' are elsewhere
            return None
    if _remote_cluster(cfg):
        return None
    processes = 1 if cfg.parallel.strategy == "single" else world_size(cfg) + 1
    what = "this machine's memory" + (f" / {processes} processes (the actors and the driver)" if processes > 1 else "")
    return Budget(_machine_memory() // processes, what)


def gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def compact(rank: RankPlan) -> str:
    """One rank's plan in one clause: ``rank 0 (actor): params 0.01 + ... = 0.69 GiB``."""
    ranks = f"rank {rank.ranks[0]}" if len(rank.ranks) == 1 else f"ranks {rank.ranks[0]}-{rank.ranks[-1]}"
    parts = [("params", rank.params), ("grads", rank.grads), ("optimizer", rank.optimizer),
             (f"activations ({rank.recompute})", rank.activations[rank.recompute]), ("workspace", rank.workspace),
             ("comm", rank.comm), ("data", rank.data), ("baseline", rank.baseline), ("heap", rank.heap)]
    shown = " + ".join(f"{name} {gib(n)}" for name, n in parts if n)
    return f"{ranks} ({rank.role}): {shown} = {gib(rank.total)} GiB"


def fix_candidates(cfg: Config) -> Iterable[Fix]:
    """Changes that lower the largest rank's bytes, cheapest for the run first."""
    t, p = cfg.train, cfg.parallel
    if t.recompute != "block":
        yield {"train.recompute": "block"}
    for factor in (2, 4, 8):
        yield {"train.grad_accum_steps": t.grad_accum_steps * factor}
    if not p.shard_optimizer and p.strategy != "single":
        yield {"parallel.shard_optimizer": True}
    if p.strategy == "expert_parallel":
        yield {"parallel.num_actors": p.num_actors * 2}
        if p.ep_size is not None:
            yield {"parallel.num_actors": p.num_actors * 2, "parallel.ep_size": p.ep_size * 2}
    elif p.strategy == "data_parallel":
        yield {"parallel.num_actors": p.num_actors * 2}
    elif p.strategy == "disaggregated":
        yield {"parallel.num_expert_actors": p.num_expert_actors * 2}
        yield {"parallel.num_coordinators": p.num_coordinators * 2}
    yield {"train.batch_size": max(1, t.batch_size // 2)}
    yield {"train.batch_size": max(1, t.batch_size // 4)}


def check_fits(cfg: Config, plan: MemoryPlan | None = None) -> None:
    """Raises a :class:`ConfigError` with the compact plan and passing fixes when a rank's plan exceeds its budget."""
    check_budget_setting(cfg)
    limit = budget(cfg)
    if limit is None:
        return
    plan = plan if plan is not None else build_plan(cfg)
    over = [r for r in plan.ranks if r.total > limit.bytes]
    if not over:
        return
    worst = max(over, key=lambda r: r.total)
    fixes = passing(cfg, fix_candidates(cfg))
    fix = ("; try " + ", or ".join(" with ".join(f"{k}={v}" for k, v in f.items()) for f in fixes)) if fixes else \
        "; no single change tried (recompute, accumulation, sharding, more actors, a smaller batch) fits: " \
        "use a smaller model or more memory"
    setting, value = _blamed(cfg)
    err = ConfigError(setting, value, f"the memory plan needs {gib(worst.total)} GiB on "
                      f"{'a GPU' if plan.device == 'cuda' else 'a process'} ({'; '.join(compact(r) for r in over)}), "
                      f"more than the {gib(limit.bytes)} GiB each may use ({limit.source}){fix}; "
                      "`moe-train ... --plan` prints the whole plan")
    err.fixes = fixes
    raise err


def _blamed(cfg: Config) -> tuple[str, object]:
    """The setting the refusal names: the budget when the user set it, else the batch (what activations follow)."""
    value = getattr(cfg.parallel, "memory_per_actor_gb", None)
    if value is not None:
        return SETTING, value
    return "train.batch_size", cfg.train.batch_size
