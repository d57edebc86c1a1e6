"""The one-GPU check: the model and the expert-parallel dispatch on CUDA, fp32 and bf16, against the CPU.

    python -m benchmarks.gpu_check                    # CUDA when visible; a few minutes on one H200
    python -m benchmarks.gpu_check --device cpu --quick   # the same path on the CPU (what CI runs)

Needs only torch: no Ray, DeepSpeed, Hydra, omegaconf, W&B, datasets or psutil (the
borrowed GPU machine has none of them). Config dataclasses are built directly, batches
are random tokens, and without DeepSpeed the collectives go through ``torch.distributed``
(:mod:`moe_trainer.parallel.torch_comm`).

What runs, each for ``--check-steps`` training steps from the same initial weights and batches:

- ``single``: the :class:`~moe_trainer.train.trainer.Trainer` with the single-process context;
- ``expert_parallel``: the same Trainer, its MoE layers dispatching through
  :class:`~moe_trainer.parallel.dispatcher.AllToAllTransport` over a one-rank group
  (NCCL on CUDA, gloo on CPU): count exchange, all-to-alls and regrouping all run;

in ``train.precision`` fp32 and bf16 (through the config, as ``moe-train`` passes it), and on
CUDA also fp32 with TF32 off (``fp32-ieee``; the product's fp32 on a GPU uses TF32 matmuls:
see moe_trainer/device.py). A CPU fp32 ``single`` run is the reference: each step's loss and
gradient norm must agree within a tolerance per precision, step 0 (the arithmetic alone)
reported on its own, at ``--lr`` 3e-4 (see ``TOLERANCE``).
Then ``--steps`` more steps are timed for tokens/s, MFU (model FLOPs per second over the
measured bf16 square-matmul rate of this device) and peak memory. Finally the expert layer
(:class:`~moe_trainer.moe.experts.SwiGLUExperts`, forward + backward on routed rows) is
timed against a plain per-expert loop of matmuls, in both dtypes, reporting which kernel
path the layer took (``grouped_mm`` when ``aten._grouped_mm`` ran, else ``mm loop``).
``--profile`` then runs 3 bf16 ``single`` steps under ``torch.profiler``: the ops that take the
device's time, the kernels' total against an unprofiled step's, and the kernel launches.

Prints tables, writes ``benchmarks/results/gpu_check.json`` (or ``--json PATH``) and exits
non-zero when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.common import print_table, write_json
from moe_trainer.config.schema import (
    ClusterConfig,
    Config,
    DataConfig,
    FaultToleranceConfig,
    LoggerConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    TrainConfig,
)
from moe_trainer.config.validate import validate_settings
from moe_trainer.device import configure_process
from moe_trainer.model.transformer import Transformer, count_parameters
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.moe.router import Router
from moe_trainer.parallel.comm import one_rank_group
from moe_trainer.parallel.context import DistributedContext, Groups
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.train.trainer import ParallelContext, SingleContext, Trainer

VOCAB = 257  # the byte tokenizer's vocabulary
# allowed relative difference from the CPU fp32 run, per step's loss and gradient norm. "fp32" on a GPU
# multiplies in TF32 (10-bit mantissa), bf16 in bf16 (8-bit), "fp32-ieee" (GPU only: TF32 off) in fp32
# itself, where only summation order differs. Step 0 (same weights, same batch) measures the arithmetic
# alone; the later steps add what the first updates make of it (Adam's first steps move each weight by
# about the learning rate whatever its gradient's size, so a rounding difference in a near-zero gradient
# becomes a full-size difference in that weight), hence --lr 3e-4 for the check and a looser bound
TOLERANCE = {"fp32-ieee": 1e-3, "fp32": 1e-2, "bf16": 5e-2}
# the runtime and driver calls that launch a kernel (cuBLAS/CUTLASS and cuDNN use the extended forms)
LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


class RandomTokens:
    """Fixed random token batches (the real corpus needs ``datasets``): the same for every run."""

    def __init__(self, batch_size: int, seq_len: int, steps: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, VOCAB, (steps, batch_size, seq_len + 1), generator=gen)

    def train_batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
        rows = self.tokens[step % len(self.tokens)]
        per = rows.shape[0] // world
        mine = rows[rank * per:(rank + 1) * per]
        return mine[:, :-1].contiguous(), mine[:, 1:].contiguous()

    def val_batches(self, n: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
        return [self.train_batch(i) for i in range(n)]


def make_config(args: argparse.Namespace, precision: str, device: torch.device) -> Config:
    cfg = Config(
        model=ModelConfig(d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                          max_seq_len=args.seq_len, ffn_hidden=4 * args.d_model),
        moe=MoEConfig(num_experts=args.experts, top_k=2, expert_hidden=args.expert_hidden),
        parallel=ParallelConfig(), data=DataConfig(seq_len=args.seq_len, token_cache=None),
        train=TrainConfig(batch_size=args.batch, warmup_steps=2, lr=args.lr, max_steps=args.check_steps + args.steps,
                          precision=precision, device=device.type),
        logger=LoggerConfig(mode="disabled", progress=False), cluster=ClusterConfig(),
        fault_tolerance=FaultToleranceConfig(),
    )
    validate_settings(cfg)  # not the memory plan: it sizes Ray actors' hosts, and measures them with Ray imported
    return cfg


class ComputeDtype(TorchDispatchMode):
    """Records the dtypes the expert matmuls ran in (what ``train.precision`` actually did)."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[str] = set()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = str(func.overloadpacket)
        self.ops.add(name)
        if name in ("aten.mm", "aten.addmm", "aten._grouped_mm"):
            self.dtypes.add(str(args[0].dtype).removeprefix("torch."))
        return func(*args, **(kwargs or {}))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def strategy(name: str, cfg: Config, device: torch.device) -> Iterator[tuple[Transformer, ParallelContext]]:
    """The model and context of ``single`` or of a one-rank ``expert_parallel``, on ``device``."""
    torch.manual_seed(cfg.train.seed)
    if name == "single":
        yield Transformer(cfg.model, cfg.moe, VOCAB, cfg.train.seed).to(device), SingleContext(device)
        return
    with one_rank_group("nccl" if device.type == "cuda" else "gloo", cfg.parallel.timeout_s) as group:
        counters = CommCounters()
        transport = AllToAllTransport(group, 1, 0, cfg.moe.num_experts, counters)
        dispatcher = Dispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor, transport)
        model = Transformer(cfg.model, cfg.moe, VOCAB, cfg.train.seed, dispatcher=dispatcher,
                            expert_range=(0, cfg.moe.num_experts)).to(device)
        groups = Groups(data=None, expert_replicas=None, replicas=1, norm=None, counts_dense_norm=True)
        yield model, DistributedContext(0, 1, groups, counters, device)


def train(name: str, cfg: Config, device: torch.device, data: RandomTokens, check_steps: int,
          timed_steps: int) -> dict[str, Any]:
    """``check_steps`` steps recorded for the comparison, then ``timed_steps`` for speed and memory."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with strategy(name, cfg, device) as (model, ctx):
        trainer = Trainer(cfg, model, data, ctx)
        watch = ComputeDtype()
        records = []
        for i in range(check_steps + timed_steps):
            if i == 0:
                with watch:
                    records.append(trainer.train_step().record)
            else:
                records.append(trainer.train_step().record)
        synchronize(device)
    timed = records[check_steps:] or records
    seconds = sum(r["step_time_s"] for r in timed)
    return {"losses": [r["loss"] for r in records[:check_steps]],
            "grad_norms": [r["grad_norm"] for r in records[:check_steps]],
            "tokens_per_s": sum(r["tokens_step"] for r in timed) / seconds,
            "step_ms": 1e3 * seconds / len(timed), "a2a_ms": 1e3 * sum(r["a2a_time_s"] for r in timed) / len(timed),
            "peak_mem_mb": max(r["mem_rss_mb"] for r in records),
            "matmul_dtypes": ",".join(sorted(watch.dtypes))}


def rel_diffs(got: list[float], want: list[float]) -> list[float]:
    """Per step: ``|got - want| / |want|``."""
    return [abs(g - w) / max(abs(w), 1e-12) for g, w in zip(got, want, strict=True)]


@contextmanager
def math_of(precision: str, device: torch.device) -> Iterator[None]:
    """``fp32-ieee``: TF32 off for the run (fp32 matmuls in fp32), then the process's settings again."""
    if precision != "fp32-ieee":
        yield
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "ieee"
    else:  # torch < 2.9
        matmul.allow_tf32 = False
    try:
        yield
    finally:
        configure_process(device)


def matmul_flops(device: torch.device, side: int, dtype: torch.dtype, iters: int = 10) -> float:
    """Achieved FLOP/s of a square matmul: the practical peak MFU is measured against."""
    a = torch.randn(side, side, device=device, dtype=dtype)
    b = torch.randn(side, side, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    synchronize(device)
    return iters * 2 * side**3 / (time.perf_counter() - t0)


def model_flops_per_token(cfg: Config) -> float:
    """Training FLOPs per token: ``6 N_active`` (matmul weights, embedding excluded) plus attention scores.

    The PaLM paper's count (Chowdhery et al., https://arxiv.org/abs/2204.02311, appendix B):
    ``6 N + 12 L D S`` with ``N`` the active non-embedding parameters.
    """
    with torch.device("meta"):
        counts = count_parameters(Transformer(cfg.model, cfg.moe, VOCAB, cfg.train.seed))
    active = counts.active - VOCAB * cfg.model.d_model  # the embedding lookup is not a matmul
    return 6 * active + 12 * cfg.model.n_layers * cfg.model.d_model * cfg.data.seq_len


def loop_experts(x_ND: Tensor, w_gate_up: Tensor, w_down: Tensor, counts: list[int]) -> Tensor:
    """The per-expert loop the grouped kernel replaces: two matmuls per expert, autograd for the backward."""
    hidden = w_down.shape[1]
    outs = []
    for e, x in enumerate(x_ND.split(counts)):
        h = x @ w_gate_up[e].to(x.dtype)
        outs.append((F.silu(h[:, :hidden]) * h[:, hidden:]) @ w_down[e].to(x.dtype))
    return torch.cat(outs)


def time_fn(fn: Callable[[], None], device: torch.device, iters: int) -> float:
    """Median milliseconds of ``fn`` after two warm-ups (synchronised: this is a benchmark, not the hot path)."""
    times = []
    for i in range(iters + 2):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return 1e3 * sorted(times)[len(times) // 2]


def expert_layer(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """``SwiGLUExperts`` forward + backward on routed rows vs the loop, in ``dtype`` (fp32 master weights)."""
    torch.manual_seed(0)
    d, f, e = args.d_model, args.expert_hidden, args.experts
    x = torch.randn(args.batch * args.seq_len, d, device=device)
    router = Router(d, MoEConfig(num_experts=e, top_k=2, expert_hidden=f)).to(device)
    with torch.no_grad():
        dispatched = Dispatcher(e, None).dispatch(x, router(x), 1)
    counts_E = dispatched.tokens_per_expert_E
    experts = SwiGLUExperts(e, d, f).to(device)
    x_ND = dispatched.x_ND.to(dtype).requires_grad_(True)
    grad = torch.randn_like(x_ND)
    row = {"dtype": str(dtype).removeprefix("torch."), "rows": x_ND.shape[0]}

    def layer() -> None:
        experts.zero_grad(set_to_none=True)
        experts(x_ND, counts_E).backward(grad)

    def loop() -> None:
        experts.zero_grad(set_to_none=True)
        loop_experts(x_ND, experts.w_gate_up_EDF2, experts.w_down_EFD, counts_E.tolist()).backward(grad)

    watch = ComputeDtype()
    try:
        with watch:
            layer()
    except (RuntimeError, TypeError) as err:  # a dtype the expert kernel does not take yet
        first = str(err).strip().splitlines()[0]
        return {**row, "path": f"unsupported: {first[:80]}"}
    row["path"] = "grouped_mm" if "aten._grouped_mm" in watch.ops else "mm loop"
    row["layer_ms"] = time_fn(layer, device, args.iters)
    row["loop_ms"] = time_fn(loop, device, args.iters)
    row["loop_over_layer"] = row["loop_ms"] / row["layer_ms"]
    return row


def profile_steps(cfg: Config, device: torch.device, data: RandomTokens, steps: int = 3) -> dict[str, Any]:
    """``steps`` training steps under ``torch.profiler`` after two warm-ups: the top ops by their own device time
    (CPU time on the CPU), and the kernels' total against the wall clock: a device busy far below 100% is
    waiting for the host (kernel launches, Python), which larger steps or CUDA graphs would amortise.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with strategy("single", cfg, device) as (model, ctx):
        trainer = Trainer(cfg, model, data, ctx)
        for _ in range(2):
            trainer.train_step()
        synchronize(device)
        activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
        with profile(activities=activities) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                trainer.train_step()
            synchronize(device)
            wall_s = time.perf_counter() - t0
    events = prof.key_averages()
    kernel = torch.autograd.DeviceType.CUDA

    def own_us(e: Any) -> float:  # torch >= 2.4 says "device"; older ones "cuda"
        if not cuda:
            return e.self_cpu_time_total
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    # on CUDA each kernel's time shows twice, as the kernel's event and as its launching op's own device time:
    # busy counts the kernels, the table the ops
    busy_s = sum(own_us(e) for e in events if not cuda or e.device_type == kernel) / 1e6
    ops = [e for e in events if e.device_type != kernel]
    rows = [{"op": e.key[:60], "calls": e.count // steps, "ms_per_step": own_us(e) / 1e3 / steps,
             "share": own_us(e) / 1e6 / max(busy_s, 1e-12)} for e in sorted(ops, key=own_us, reverse=True)[:15]]
    return {"steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps, "busy_ms_per_step": 1e3 * busy_s / steps,
            "launches_per_step": sum(e.count for e in events if e.key in LAUNCHES) / steps, "top": rows}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds on a CPU): the test's run")
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-hidden", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="sequences per step")
    parser.add_argument("--check-steps", type=int, default=3, help="steps compared with the CPU fp32 run")
    parser.add_argument("--steps", type=int, default=20, help="further steps timed")
    parser.add_argument("--lr", type=float, default=3e-4,
                        help="peak learning rate of every run (moe-train's 3e-3 moves d_model-1024 weights by a sixth "
                             "of their scale in the first steps: the loss rises and runs drift apart on rounding)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations of the expert layer")
    parser.add_argument("--square", type=int, default=8192, help="side of the bf16 matmul MFU is measured against")
    parser.add_argument("--profile", action="store_true",
                        help="then profile 3 bf16 single steps: the ops taking the device's time, and how busy it is")
    parser.add_argument("--json", type=Path, default=None, help="where to write the result (default: results/)")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in (("d_model", 32), ("layers", 2), ("heads", 2), ("experts", 4), ("expert_hidden", 32),
                            ("seq_len", 32), ("batch", 4), ("check_steps", 2), ("steps", 2), ("iters", 2),
                            ("square", 256)):
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    device = torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu")
    data = RandomTokens(args.batch, args.seq_len, args.check_steps + args.steps)
    # the reference first, before this process allows TF32 on the GPU
    cpu = torch.device("cpu")
    reference = train("single", make_config(args, "fp32", cpu), cpu, data, args.check_steps, 0)
    configure_process(device)
    peak = matmul_flops(device, args.square, torch.bfloat16)
    flops_per_token = model_flops_per_token(make_config(args, "fp32", device))
    runs, failed = [], False
    precisions = ("fp32-ieee", "fp32", "bf16") if device.type == "cuda" else ("fp32", "bf16")
    for precision in precisions:
        cfg = make_config(args, precision.removesuffix("-ieee"), device)
        for name in ("single", "expert_parallel"):
            with math_of(precision, device):
                run = train(name, cfg, device, data, args.check_steps, args.steps)
            loss_diffs = rel_diffs(run["losses"], reference["losses"])
            norm_diffs = rel_diffs(run["grad_norms"], reference["grad_norms"])
            ok = max(loss_diffs + norm_diffs) <= TOLERANCE[precision]
            failed |= not ok
            runs.append({"strategy": name, "precision": precision, "matmul_dtypes": run["matmul_dtypes"],
                         "step0_loss_diff": loss_diffs[0], "step0_norm_diff": norm_diffs[0],
                         "loss_rel_diff": max(loss_diffs), "grad_norm_rel_diff": max(norm_diffs),
                         "check": "ok" if ok else f"FAIL (> {TOLERANCE[precision]:g})",
                         "tokens_per_s": run["tokens_per_s"], "step_ms": run["step_ms"], "a2a_ms": run["a2a_ms"],
                         "mfu": run["tokens_per_s"] * flops_per_token / peak, "peak_mem_mb": run["peak_mem_mb"],
                         "losses": run["losses"], "grad_norms": run["grad_norms"],
                         "loss_rel_diffs": loss_diffs, "grad_norm_rel_diffs": norm_diffs})
            print(f"done: {name} {precision}", flush=True)
    experts = [expert_layer(args, device, dtype) for dtype in (torch.float32, torch.bfloat16)]
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}; bf16 {args.square}^2 matmul: {peak / 1e12:.3f} TFLOP/s; "
          f"model: {flops_per_token / 1e6:.1f} MFLOP per token; CPU fp32 reference losses {reference['losses']}")
    diffs = ("step0_loss_diff", "step0_norm_diff", "loss_rel_diff", "grad_norm_rel_diff")
    print_table([{**r, **{k: f"{r[k]:.1e}" for k in diffs}} for r in runs],
                ["strategy", "precision", "matmul_dtypes", *diffs, "check", "tokens_per_s", "step_ms", "a2a_ms", "mfu",
                 "peak_mem_mb"])
    print_table(experts, ["dtype", "rows", "path", "layer_ms", "loop_ms", "loop_over_layer"])
    prof = None
    if args.profile:
        prof = profile_steps(make_config(args, "bf16", device), device, data)
        if device.type == "cuda":  # on the CPU the ops' own time is the step, profiler overhead included
            step_ms = next(r["step_ms"] for r in runs if (r["strategy"], r["precision"]) == ("single", "bf16"))
            prof["busy_fraction"] = prof["busy_ms_per_step"] / step_ms
            print(f"profile, bf16 single: the device busy {prof['busy_ms_per_step']:.1f} ms a step, of the "
                  f"{step_ms:.1f} ms an unprofiled step takes ({100 * prof['busy_fraction']:.0f}%; "
                  f"{prof['wall_ms_per_step']:.1f} ms under the profiler), {prof['launches_per_step']:.0f} "
                  "kernel launches")
        print_table(prof["top"], ["op", "calls", "ms_per_step", "share"])
    payload = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "bf16_matmul_flops": peak, "model_flops_per_token": flops_per_token,
               "reference_losses": reference["losses"], "reference_grad_norms": reference["grad_norms"],
               "runs": runs, "experts": experts, "profile": prof,
               "wall_s": time.perf_counter() - t_start, "passed": not failed}
    if args.json is not None:
        args.json.write_text(json.dumps(payload, indent=1))
        print(args.json)
    else:
        print(write_json("gpu_check", payload))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
