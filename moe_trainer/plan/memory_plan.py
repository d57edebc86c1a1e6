"""The memory plan: bytes per role and rank, from the config, before anything starts.

Per rank (ranks holding the same tensors are one row):

- **parameters**: fp32 (they are the master weights under ``train.precision=bf16``; the bf16
  copies a forward makes are activations), plus buffers (rotary tables, router biases);
- **gradients**: fp32, one per parameter (expert gradients live in reused buffers, dense ones
  come back every step into the retained heap: both count);
- **optimizer**: AdamW's two fp32 moments (``parallel.shard_optimizer``: this rank's share,
  :mod:`moe_trainer.plan.sharding`);
- **activations**: what a forward keeps for backward under each ``train.recompute`` mode
  (:mod:`moe_trainer.plan.activations`), and the backward's workspace on top;
- **communication**: one MoE layer's rows in flight to other ranks (all-to-all or point to
  point) and the flat buffer of a gradient all-reduce;
- **data**: the in-memory token streams (``data.token_cache`` maps them from disk instead,
  where the page cache holds them: reported, not counted);
- **baseline**: a process's imports, measured (:mod:`moe_trainer.plan.baseline`), and under
  bf16 on the CPU the matmul kernels oneDNN compiles and caches per shape (:func:`cpu_bf16_kernels`);
- **heap**: what a host process's heap holds beyond its live tensors at the step's peak
  (:data:`HEAP_OVERHEAD`, measured by ``benchmarks/memory_plan.py``).

The peak of a step is the backward's start (kept activations, workspace, rows in flight) plus
the flat buffer of the gradient all-reduce that follows (:attr:`RankPlan.step_peak`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from moe_trainer.config.schema import RECOMPUTE_MODES, Config
from moe_trainer.plan.activations import Widths, backward_workspace, expert_actor_kept, trainer_kept
from moe_trainer.plan.baseline import Baseline, process_baseline
from moe_trainer.plan.ranks import RankShape, planned_vocab_size, rank_shapes
from moe_trainer.plan.sharding import optimizer_numel

FP32 = 4
ADAM_MOMENTS = 2
MIB = 2**20
# Fraction of a step's transient bytes (activations, workspace, rows in flight) that a host
# process's heap holds on top of them at its peak: glibc keeps freed blocks for reuse
# (train.retain_freed_memory) and blocks of new sizes land past the holes earlier ones left.
# Measured by benchmarks/memory_plan.py (docs/benchmarks.md, "Memory plan"): the driver's main
# thread allocates from the main heap, a Ray actor's calls run in a thread of their own, whose
# glibc arena keeps more; 0 on a GPU (the caching allocator's own reserve is not modelled).
HEAP_OVERHEAD = {"main": 0.35, "actor": 1.0}
ONEDNN_CACHE_CAPACITY = 1024  # kernels oneDNN keeps (ONEDNN_PRIMITIVE_CACHE_CAPACITY's default)
RAY_WORKER_BYTES = 14 * MIB  # a Ray worker's core-worker runtime over a plain interpreter (benchmarks/memory_plan.py)


@dataclass(frozen=True)
class RankPlan:
    """Bytes of one rank (or of each of several identical ranks)."""

    role: str
    ranks: tuple[int, ...]
    experts: tuple[tuple[int, int], ...]  # per rank: (first global expert, count)
    params: int
    grads: int
    optimizer: int
    activations: dict[str, int]  # kept for backward, per train.recompute mode
    recompute: str  # the configured mode: the one counted in the total
    workspace: int  # the backward's transient bytes on top of the kept ones
    comm: int  # rows in flight of one MoE layer (all-to-all or point to point)
    grad_sync: int  # flat buffer of the gradient all-reduce (after the activations are freed)
    data: int  # in-memory token streams
    data_mapped: int  # memory-mapped token files (page cache; not counted)
    baseline: int  # the process's imports (host) or 0 (GPU)
    kernels: int  # bf16 matmul kernels oneDNN caches (CPU only)
    heap: int  # heap overhead over the step's transients (host only)
    on_gpu: bool

    @property
    def state(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def transient(self) -> int:
        """The step's bytes at the backward's start: kept activations, the workspace, rows in flight."""
        return self.activations[self.recompute] + self.workspace + self.comm

    @property
    def step_peak(self) -> int:
        """The transient bytes, and the all-reduce's flat buffer on top: it comes after the activations are
        freed, but their blocks lie between the gradients the backward allocated, and a buffer the size of
        all gradients does not fit in those holes (measured: ``data_parallel`` at ~50M expert parameters)."""
        return self.transient + self.grad_sync

    @property
    def total(self) -> int:
        """Peak bytes of this rank: host RSS on the CPU, allocated device memory on a GPU."""
        return self.baseline + self.kernels + self.data + self.state + self.step_peak + self.heap


@dataclass
class MemoryPlan:
    ranks: list[RankPlan]
    device: str  # "cpu" or "cuda"
    notes: list[str] = field(default_factory=list)

    def largest(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.total)


def _in_memory_tokens(cfg: Config) -> int:
    """Tokens of both splits held in memory: byte-level, one token per byte of text (an upper bound otherwise)."""
    d = cfg.data
    if d.token_cache is not None:
        return 0
    if d.paths:
        from moe_trainer.data.paths import expand_data_paths  # the loader's own expansion

        return sum(Path(p).stat().st_size for p in expand_data_paths(list(d.paths)))
    if d.hub_name:
        return 0  # not known before download: see MemoryPlan.notes
    return d.embedded_max_bytes


def _mapped_bytes(cfg: Config) -> int:
    root = cfg.data.token_cache
    if root is None or not Path(root).is_dir():
        return 0
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def _rows_per_token(cfg: Config, w: Widths) -> float:
    """Expert rows per token of a forward: k, fewer when a capacity factor below 1 drops some."""
    cf = cfg.moe.capacity_factor
    return w.k * (min(1.0, cf) if cf is not None else 1.0)


def cpu_bf16_kernels(cfg: Config, shape: RankShape, rows_per_token: float) -> int:
    """bf16 matmul kernels a rank compiles on the CPU: each new matmul shape gets one, kept by oneDNN.

    The linear layers have fixed shapes (forward, input and weight gradient: 3 each, about 6
    kinds of layer). Expert runs are padded to bucketed lengths (8 per octave,
    :func:`moe_trainer.moe.experts.bucketed`), and each bucket a run reaches costs 6 kernels (2
    forward matmuls, 2 input and 2 weight gradients). Runs spread around the balanced length
    as routing moves: from half of it to 4 times it is what the measured runs needed
    (docs/benchmarks.md, "Memory plan").
    """
    from moe_trainer.moe.experts import bucketed

    linear = 3 * 6
    if shape.local_experts == 0 or cfg.model.arch != "moe":
        return linear
    if shape.role == "expert actor":  # one call per message, of its rows for each local expert
        balanced = shape.tokens / shape.micro_batches / shape.local_experts
    else:  # one call per micro-batch, of the rows every rank of the expert-parallel group sends each expert
        balanced = shape.tokens / shape.micro_batches * rows_per_token * shape.ep_size / cfg.moe.num_experts
    buckets, n = 0, max(1, int(balanced / 2))
    while n <= 4 * balanced:  # every padded length from half to 4 times the balanced one
        buckets += 1
        n = bucketed([n])[0] + 1
    return min(ONEDNN_CACHE_CAPACITY, linear + 6 * buckets)


@dataclass(frozen=True)
class _Step:
    """The bytes of one step that every rank of a shape shares."""

    kept: dict[str, int]  # per train.recompute mode
    workspace: int
    comm: int
    grad_sync: int


def _step(cfg: Config, shape: RankShape, w: Widths, rows: float) -> _Step:
    """Activations per mode, the backward's workspace, rows in flight and the all-reduce buffer of ``shape``."""
    experts_here = shape.role != "coordinator"
    kept = {}
    for mode in RECOMPUTE_MODES:
        mode_cfg = _with_recompute(cfg, mode)
        if shape.role == "expert actor":
            kept[mode] = expert_actor_kept(mode_cfg, w, shape.local_experts, shape.micro_batches).bytes(shape.tokens)
        else:
            kept[mode] = trainer_kept(mode_cfg, w, shape.local_experts, shape.micro_batches, rows,
                                      experts_here).bytes(shape.tokens)
    comm = 0
    if shape.role == "expert actor":  # one message's expert backward; one layer's outputs on their way back
        workspace = int(w.b * (4 * w.expert_hidden + 2 * w.d) * shape.tokens / shape.micro_batches)
        comm = int(w.b * w.d * shape.tokens)
    else:
        workspace = backward_workspace(cfg, w, shape.tokens, rows, experts_here)
        if shape.ep_size > 1 or shape.role == "coordinator":
            comm = int(w.b * w.k * w.d * shape.tokens)  # one layer's dispatched rows on their way
    dense_grad = FP32 * shape.dense_numel if shape.dp_ranks > 1 else 0
    expert_grad = FP32 * shape.expert_numel if shape.replicas > 1 else 0
    return _Step(kept, workspace, comm, max(dense_grad, expert_grad))  # one flat buffer at a time


def _host_fixed(cfg: Config, shape: RankShape, base: Baseline, rows: float) -> tuple[int, int]:
    """``(baseline, bf16 kernels)`` of a host process of ``shape``: the driver (single) or a Ray actor."""
    if shape.role == "single":
        baseline = base.rank + base.driver + (base.logger if cfg.logger.mode != "disabled" else 0)
    else:
        baseline = base.rank + RAY_WORKER_BYTES
    kernels = int(base.bf16_kernel * cpu_bf16_kernels(cfg, shape, rows)) if cfg.train.precision == "bf16" else 0
    return baseline, kernels


def _rank_plans(cfg: Config, shape: RankShape, base: Baseline, on_gpu: bool, data_tokens: int,
                mapped: int) -> list[RankPlan]:
    """One plan per rank of ``shape`` (they differ only in a sharded optimizer's share), merged where equal."""
    w = Widths.of(cfg, planned_vocab_size(cfg), on_gpu)
    rows = _rows_per_token(cfg, w)
    step = _step(cfg, shape, w, rows)
    host = not on_gpu
    baseline, kernels = _host_fixed(cfg, shape, base, rows) if host else (0, 0)
    loads_data = host and shape.role != "expert actor"  # expert actors get rows, not token streams
    heap_fraction = HEAP_OVERHEAD["main" if shape.role == "single" else "actor"] if host else 0.0
    transient = step.kept[cfg.train.recompute] + step.workspace + step.comm
    numel = shape.dense_numel + shape.expert_numel
    plans = []
    for rank, experts in zip(shape.ranks, shape.experts, strict=True):
        moments = optimizer_numel(cfg, shape.params, rank, shape.role)
        plans.append(RankPlan(
            role=shape.role, ranks=(rank,), experts=(experts,), params=FP32 * numel + shape.buffer_bytes,
            grads=FP32 * numel, optimizer=ADAM_MOMENTS * FP32 * moments, activations=step.kept,
            recompute=cfg.train.recompute, workspace=step.workspace, comm=step.comm, grad_sync=step.grad_sync,
            data=int(base.data_per_token * data_tokens) if loads_data else 0,
            data_mapped=mapped if loads_data else 0, baseline=baseline, kernels=kernels,
            heap=int(heap_fraction * transient), on_gpu=on_gpu,
        ))
    return _merge_equal(plans)


def _merge_equal(plans: list[RankPlan]) -> list[RankPlan]:
    """Consecutive ranks with equal bytes become one row (their ranks and experts listed)."""
    merged: list[RankPlan] = []
    for plan in plans:
        last = merged[-1] if merged else None
        if last is not None and last.role == plan.role and last.total == plan.total and last.state == plan.state:
            merged[-1] = _extend(last, plan)
        else:
            merged.append(plan)
    return merged


def _extend(a: RankPlan, b: RankPlan) -> RankPlan:
    return replace(a, ranks=a.ranks + b.ranks, experts=a.experts + b.experts)


def _with_recompute(cfg: Config, mode: str) -> Config:
    from moe_trainer.config.fixes import apply

    return cfg if cfg.train.recompute == mode else apply(cfg, {"train.recompute": mode})


def on_gpu(cfg: Config) -> bool:
    """Whether the ranks compute on GPUs (validation has made every rank agree)."""
    from moe_trainer.parallel.resources import role_resources

    if cfg.parallel.strategy == "single":
        if cfg.train.device == "cuda":
            return True
        if cfg.train.device == "cpu":
            return False
        import torch

        return torch.cuda.is_available()
    return role_resources(cfg)[0].gpus > 0


def build_plan(cfg: Config, baseline: Baseline | None = None) -> MemoryPlan:
    """The plan of a validated config. ``baseline``: a given measurement (tests), else the cached one."""
    gpu = on_gpu(cfg)
    base = baseline if baseline is not None else (Baseline(0, 0, 0, 0.0) if gpu else process_baseline())
    tokens, mapped = _in_memory_tokens(cfg), _mapped_bytes(cfg)
    ranks = [plan for shape in rank_shapes(cfg) for plan in _rank_plans(cfg, shape, base, gpu, tokens, mapped)]
    notes = []
    if cfg.data.hub_name and cfg.data.token_cache is None:
        notes.append("data: a Hub dataset's size is not known before it is downloaded; its token streams "
                     f"(about {base.data_per_token:.0f} bytes per token) are not counted")
    if cfg.moe.capacity_factor is None and any(r.role == "actor" for r in ranks) and ranks[0].experts[0][1] < \
            cfg.moe.num_experts:
        notes.append("dropless routing: an expert-parallel rank's rows are planned balanced; early in training "
                     "a rank may get more (moe.capacity_factor bounds them)")
    return MemoryPlan(ranks, "cuda" if gpu else "cpu", notes)
