"""Full training step time as the expert count grows at fixed top-k (equal active FLOPs per token).

    .venv/bin/python -m benchmarks.expert_scaling [--experts 8 16 32 64 128] [--strategies single expert_parallel]
        [--kernels auto loop] [--steps 20] [--warmup 5] [--threads 1] [--overrides model.d_model=256 ...] [--quick]

The pre-2026-12-04 default model (``benchmarks.common.OLD_DEFAULT``: 4 layers, d_model 128,
``moe.top_k=2``, ``moe.expert_hidden=256``, every block MoE, batch 16 x 128 tokens, dropless)
with ``moe.num_experts`` varied; ``--overrides`` are
Hydra overrides applied to every row (e.g. ``moe.capacity_factor=1.25``). Active FLOPs
per token do not change with the expert count, only the number of (smaller) per-expert
matmuls, the router's width and the expert parameters (and their AdamW state).

- ``single``: one process (``moe_trainer.engine.LocalEngine``), every expert in it.
- ``expert_parallel``: 2 spawned processes, one thread each, joined in one gloo group
  (``moe_trainer.parallel.setup.build_rank``, as a Ray actor does); each holds half the
  experts. A step lasts as long as its slowest rank: the step time is the max over ranks.
- ``--kernels``: the expert kernels (``SwiGLUExperts.kernel``): ``auto`` (grouped GEMM
  where it serves, the default) and ``loop`` (one matmul per expert, the kernels before
  issue 14), measured side by side.

All engines of a strategy live in the same process(es), are built first and stepped
round-robin, ``--chunk`` steps at a time, so background load hits every row alike. Step
time is the trainer's own ``step_time_s`` (batch, forward, backward, clip, AdamW step);
reported: median over the steps after each engine's first ``--warmup``, and the ratio to
the smallest expert count with the same strategy and kernels (``ratio_paired``: median of
the same-step ratios). ``cpu_ratio``: the same ratio of the process CPU time per step
(``time.process_time``, max over ranks), which other processes on a shared box disturb
much less than the wall clock (it still moves with their cache and memory traffic, and it
leaves out a rank's idle wait for its peer).
``--quick``: 8 and 128 experts, 10 steps after 3 (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any
from unittest import mock

import torch

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from benchmarks.procs import run_ranks
from moe_trainer.engine import LocalEngine
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.train.trainer import Trainer


def set_kernel(model: torch.nn.Module, kernel: str) -> None:
    for module in model.modules():
        if isinstance(module, SwiGLUExperts):
            module.kernel = kernel


def overrides_for(experts: int, args: dict[str, Any], strategy: str) -> list[str]:
    parallel = ["parallel=expert_parallel", "parallel.num_actors=2"] if strategy == "expert_parallel" else []
    return [*OLD_DEFAULT, *parallel, f"moe.num_experts={experts}", f"moe.top_k={args['top_k']}", "logger.mode=disabled",
            "logger.progress=false", *args["overrides"]]


def round_robin(steppers: dict[tuple[int, str], Any], args: dict[str, Any], say: bool) -> dict[tuple[int, str], list]:
    """Steps every engine ``chunk`` steps at a time until each has ``warmup + steps``; their records."""
    records: dict[tuple[int, str], list[dict[str, Any]]] = {key: [] for key in steppers}
    total = args["warmup"] + args["steps"]
    while any(len(r) < total for r in records.values()):
        for key, step in steppers.items():
            for _ in range(min(args["chunk"], total - len(records[key]))):
                c0 = time.process_time()
                record = step()
                records[key].append({**record, "cpu_s": time.process_time() - c0})
        if say:
            print(f"steps done per engine: {min(len(r) for r in records.values())}/{total}", flush=True)
    return records


def single(args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(args["threads"])
    steppers, info = {}, {}
    for experts in args["experts"]:
        for kernel in args["kernels"]:
            cfg, _ = config(overrides_for(experts, args, "single"))
            engine = LocalEngine(cfg)
            set_kernel(engine.trainer.model, kernel)
            steppers[(experts, kernel)] = lambda t=engine.trainer: t.train_step().record
            info[(experts, kernel)] = {**engine_info(engine),
                                       "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len}
    records = round_robin(steppers, args, say=True)
    return [{"strategy": "single", "experts": e, "kernel": k, **info[(e, k)],
             "step_times_s": [r["step_time_s"] for r in records[(e, k)][args["warmup"]:]],
             "cpu_times_s": [r["cpu_s"] for r in records[(e, k)][args["warmup"]:]],
             "final_loss": records[(e, k)][-1]["loss"]} for (e, k) in steppers]


def ep_rank(rank: int, world: int, port: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    """One rank of the expert_parallel rows: every (experts, kernel) trainer joined to the same process group."""
    torch.set_num_threads(1)
    from moe_trainer.parallel import setup

    steppers, info = {}, {}
    for i, experts in enumerate(args["experts"]):
        for j, kernel in enumerate(args["kernels"]):
            cfg, _ = config(overrides_for(experts, args, "expert_parallel"))
            if i == 0 and j == 0:
                built = setup.build_rank(cfg, rank, "127.0.0.1", port)
            else:  # the process group exists: build only this layout's groups and trainer
                with mock.patch.object(setup, "init_process_group"):
                    built = setup.build_rank(cfg, rank, "127.0.0.1", port)
            assert isinstance(built.runner, Trainer)
            set_kernel(built.runner.model, kernel)
            steppers[(experts, kernel)] = lambda t=built.runner: t.train_step().record
            info[(experts, kernel)] = {"tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
                                       "params_experts_per_rank": sum(
                                           p.numel() for n, p in built.runner.model.named_parameters()
                                           if ".experts." in n)}
    records = round_robin(steppers, args, say=rank == 0)
    return [{"strategy": "expert_parallel", "experts": e, "kernel": k, **info[(e, k)],
             "step_times_s": [r["step_time_s"] for r in records[(e, k)][args["warmup"]:]],
             "cpu_times_s": [r["cpu_s"] for r in records[(e, k)][args["warmup"]:]],
             "final_loss": records[(e, k)][-1]["loss"]} for (e, k) in steppers]


def expert_parallel(args: dict[str, Any]) -> list[dict[str, Any]]:
    ranks = run_ranks(ep_rank, 2, args)
    rows = ranks[0]
    for i, row in enumerate(rows):  # a step lasts as long as its slowest rank
        for key in ("step_times_s", "cpu_times_s"):
            row[key] = [max(ts) for ts in zip(*(r[i][key] for r in ranks), strict=True)]
    return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        times = r["step_times_s"]
        r.update({"median_step_s": statistics.median(times), "min_step_s": min(times),
                  "p75_step_s": sorted(times)[(3 * len(times)) // 4],
                  "tokens_per_s": r["tokens_per_step"] / statistics.median(times),
                  "median_cpu_s": statistics.median(r["cpu_times_s"])})
    for r in rows:
        base = min((b for b in rows if b["strategy"] == r["strategy"] and b["kernel"] == r["kernel"]),
                   key=lambda b: b["experts"])
        r["ratio_to_first"] = r["median_step_s"] / base["median_step_s"]
        # same-step ratio (the engines stepped in turn, so slow phases of the box hit both alike)
        r["ratio_paired"] = statistics.median(a / b for a, b in zip(r["step_times_s"], base["step_times_s"],
                                                                    strict=True))
        r["cpu_ratio"] = r["median_cpu_s"] / base["median_cpu_s"]
    return rows


def goals(rows: list[dict[str, Any]], experts: list[int]) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        if r["experts"] == 128 and r["kernel"] == "auto":
            out.append({"target": f"{r['strategy']}: step at 128 experts <= 1.3x the {experts[0]}-expert step",
                        "ratio": r["ratio_to_first"], "ratio_paired": r["ratio_paired"], "cpu_ratio": r["cpu_ratio"],
                        "holds": None if experts[0] != 8 else r["ratio_to_first"] <= 1.3})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--strategies", nargs="+", choices=["single", "expert_parallel"],
                        default=["single", "expert_parallel"])
    parser.add_argument("--kernels", nargs="+", choices=["auto", "loop"], default=["auto", "loop"])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per expert count")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5, help="steps per engine per round-robin turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of `single` (1: steadier on 2 cores)")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every row")
    parser.add_argument("--quick", action="store_true", help="8 and 128 experts, 10 steps after 3 warmup")
    args = vars(parser.parse_args())
    if args["quick"]:
        args.update(experts=[8, 128], steps=10, warmup=3, chunk=2)
    load_start = loadavg()
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if "single" in args["strategies"]:
        rows += single(args)
    if "expert_parallel" in args["strategies"]:
        rows += expert_parallel(args)
    rows = summarise(rows)
    print_table(rows, ["strategy", "experts", "kernel", "median_step_s", "min_step_s", "p75_step_s", "tokens_per_s",
                       "ratio_to_first", "ratio_paired", "median_cpu_s", "cpu_ratio"])
    targets = goals(rows, args["experts"])
    print_table(targets, ["target", "ratio", "ratio_paired", "cpu_ratio", "holds"])
    print(write_json("expert_scaling", {"args": args, "threads": args["threads"], "rows": rows, "targets": targets,
                                        "wall_s": time.perf_counter() - t0, "loadavg_start": load_start,
                                        "loadavg_end": loadavg()}))


def engine_info(engine: LocalEngine) -> dict[str, Any]:
    got = engine.info()
    return {"params_total": got["params_total"], "params_active": got["params_active"],
            "params_experts": got["params_experts"]}


if __name__ == "__main__":
    main()
