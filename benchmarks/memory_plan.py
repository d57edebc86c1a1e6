"""The memory plan against each process's measured peak resident memory.

    python -m benchmarks.memory_plan [--steps 10] [--sizes default wide2x experts32 wide4x]
                                     [--layouts single expert_parallel_x2] [--extra train.precision=bf16 ...]

For every model size and layout: the plan (:func:`moe_trainer.plan.build_plan`, what
``moe-train ... --plan`` prints) of every rank, and every process's peak RSS (``VmHWM``)
after ``--steps`` training steps: ``single`` in a spawned process, the Ray layouts as actor
groups on a local cluster (both through ``benchmarks.memory``). The target: the plan within
15 % of every measured process. Each ``--extra`` is a set of overrides measured as further cases
(``--extra "train.recompute=block" "train.precision=bf16"``).
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any

import ray

from benchmarks.common import config, loadavg, print_table, write_json
from benchmarks.memory import RayRun, SingleRun
from moe_trainer.plan import build_plan
from moe_trainer.plan.baseline import process_baseline
from moe_trainer.plan.memory_plan import RAY_WORKER_BYTES

SIZES = {
    "default": [],
    "wide2x": ["model.d_model=256", "model.ffn_hidden=1024", "moe.expert_hidden=512"],
    "experts32": ["moe.num_experts=32"],
    "wide4x": ["model.d_model=512", "model.n_heads=8", "model.ffn_hidden=2048", "moe.expert_hidden=1024"],
}
LAYOUTS = {
    "single": ["parallel=single"],
    "data_parallel_x2": ["parallel=data_parallel", "parallel.num_actors=2", "parallel.cpus_per_actor=1"],
    "expert_parallel_x2": ["parallel=expert_parallel", "parallel.num_actors=2", "parallel.cpus_per_actor=1"],
    "disaggregated_1c2e": ["parallel=disaggregated", "parallel.num_coordinators=1", "parallel.num_expert_actors=2",
                           "parallel.cpus_per_actor=1"],
}
COMMON = ["logger.mode=disabled", "logger.progress=false", "train.checkpoint_every=0"]
TARGET = 0.15


def _idle_rank_rss() -> int:
    """Resident bytes of a Ray worker once it imported what a rank imports (the plan's baseline measures a plain
    interpreter; the difference is ``RAY_WORKER_BYTES``)."""
    import torch

    import moe_trainer.engine  # noqa: F401
    import moe_trainer.parallel.setup  # noqa: F401
    from moe_trainer.host_memory import retain_freed_memory

    retain_freed_memory()
    torch.ones(256, 256) @ torch.ones(256, 256)
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def ray_worker_overhead(rank_baseline: int) -> float:
    """MiB a fresh Ray actor holds beyond the plan's measured rank baseline."""
    worker = ray.remote(num_cpus=0)(_idle_rank_rss)
    return (ray.get(worker.remote()) - rank_baseline) / 2**20


def measure(overrides: list[str], layout: str, steps: int) -> list[float]:
    """Peak RSS (MiB) of every process of one run after ``steps`` steps."""
    run = SingleRun(overrides) if layout == "single" else RayRun(overrides)
    for _ in range(steps):
        run.step()
    return run.finish()


def case(size: str, layout: str, extra: list[str], steps: int) -> dict[str, Any]:
    overrides = [*COMMON, *LAYOUTS[layout], *SIZES[size], *extra, f"train.max_steps={steps}"]
    cfg, _ = config(overrides)
    plan = build_plan(cfg)
    peaks = measure(overrides, layout, steps)
    per_rank = {rank: r for r in plan.ranks for rank in r.ranks}  # processes come back in rank order
    planned = [per_rank[rank].total / 2**20 for rank in range(len(peaks))]
    errors = [(p - m) / m for p, m in zip(planned, peaks, strict=True)]
    largest = plan.largest()
    return {"size": size, "layout": layout, "extra": " ".join(extra) or "-",
            "params_m": (largest.params // 4) / 1e6, "plan_mib": " / ".join(f"{p:,.0f}" for p in planned),
            "plan_per_process": planned,
            "measured_mib": " / ".join(f"{p:,.0f}" for p in peaks), "measured_per_process": peaks,
            "error_pct": " / ".join(f"{100 * e:+.1f}" for e in errors), "worst_error": max(map(abs, errors)),
            "within_target": all(abs(e) <= TARGET for e in errors),
            "largest_rank_parts_mib": {k: v / 2**20 for k, v in {
                "params": largest.params, "grads": largest.grads, "optimizer": largest.optimizer,
                "activations": largest.activations[largest.recompute], "workspace": largest.workspace,
                "comm": largest.comm + largest.grad_sync, "data": largest.data, "baseline": largest.baseline,
                "kernels": largest.kernels, "heap": largest.heap}.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", default=["default", "wide2x", "experts32", "wide4x"], choices=SIZES)
    parser.add_argument("--layouts", nargs="+", default=["single", "expert_parallel_x2"], choices=LAYOUTS)
    parser.add_argument("--extra", nargs="*", default=[], help="override sets measured as further cases")
    parser.add_argument("--out", default="memory_plan", help="name of the JSON result in benchmarks/results/")
    args = parser.parse_args()
    load_before = loadavg()
    baseline = process_baseline()  # measured (or cached) before the runs load the machine
    ray_layouts = any(layout != "single" for layout in args.layouts)
    worker_mib = 0.0
    if ray_layouts:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=4)
    rows = []
    with contextlib.ExitStack() as stack:
        if ray.is_initialized():
            stack.callback(ray.shutdown)
            worker_mib = ray_worker_overhead(baseline.rank)
            print(f"a Ray worker over a plain interpreter: {worker_mib:+.1f} MiB (the plan counts "
                  f"{RAY_WORKER_BYTES / 2**20:.0f})")
        for extra in [[], *(e.split() for e in args.extra)]:
            for size in args.sizes:
                for layout in args.layouts:
                    rows.append(case(size, layout, extra, args.steps))
                    print_table(rows[-1:], ["size", "layout", "extra", "plan_mib", "measured_mib", "error_pct"])
    print_table(rows, ["size", "layout", "extra", "params_m", "plan_mib", "measured_mib", "error_pct",
                       "within_target"])
    worst = max(r["worst_error"] for r in rows)
    print(f"worst |plan - measured| / measured: {100 * worst:.1f} % (target {100 * TARGET:.0f} %)")
    print(write_json(args.out, {"args": vars(args), "baseline": baseline.__dict__,
                                "ray_worker_mib": worker_mib if ray_layouts else None, "loadavg_before": load_before,
                                "loadavg_after": loadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
