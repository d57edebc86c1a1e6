"""The memory plan against each process's measured peak resident memory.

    python -m benchmarks.memory_plan [--steps 10] [--sizes default wide2x experts32 wide4x]
                                     [--layouts single expert_parallel_x2] [--extra train.precision=bf16 ...]

For every model size and layout: the plan (:func:`moe_trainer.plan.build_plan`, what
``moe-train ... --plan`` prints) of every rank, and every process's peak RSS (``VmHWM``)
after ``--steps`` training steps: ``single`` in a spawned process, the Ray layouts as actor
groups on a local cluster (both through ``benchmarks.memory``). The target: the plan within
15 % of every measured process. Every case starts from the pre-2026-12-04 default model
(``benchmarks.common.OLD_DEFAULT``, what docs/benchmarks.md measured): size ``default`` is that
model as it is, the others change it as :data:`SIZES` says. Each ``--extra`` is a set of
overrides measured as further cases (``--extra "train.recompute=block" "train.precision=bf16"``).
``--replan JSON`` re-plans the cases of an earlier result against its measured peaks, without
running them (the peaks do not depend on the plan).
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import ray

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from benchmarks.memory import RayRun, SingleRun
from moe_trainer.plan import build_plan
from moe_trainer.plan.baseline import process_baseline
from moe_trainer.plan.memory_plan import RAY_WORKER_BYTES

SIZES = {  # on top of OLD_DEFAULT (the names predate 2026-12-04: "default" is the default of then)
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


def row(size: str, layout: str, extra: list[str], steps: int, peaks: list[float]) -> dict[str, Any]:
    """The plan of every rank of one case against its processes' measured peaks (MiB, in rank order)."""
    cfg, _ = config(overrides(size, layout, extra, steps))
    plan = build_plan(cfg)
    per_rank = {rank: r for r in plan.ranks for rank in r.ranks}
    planned = [per_rank[rank].total / 2**20 for rank in range(len(peaks))]
    errors = [(p - m) / m for p, m in zip(planned, peaks, strict=True)]
    largest = plan.largest()
    return {"size": size, "layout": layout, "extra": " ".join(extra) or "-", "steps": steps,
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


def overrides(size: str, layout: str, extra: list[str], steps: int) -> list[str]:
    return [*OLD_DEFAULT, *COMMON, *LAYOUTS[layout], *SIZES[size], *extra, f"train.max_steps={steps}"]


def replan(path: str) -> list[dict[str, Any]]:
    """The rows of an earlier result with the current plan (the measured peaks do not depend on it)."""
    earlier = json.loads(Path(path).read_text())
    return [row(r["size"], r["layout"], [] if r["extra"] == "-" else r["extra"].split(),
                r.get("steps", earlier["args"]["steps"]), r["measured_per_process"]) for r in earlier["rows"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--sizes", nargs="+", default=["default", "wide2x", "experts32", "wide4x"], choices=SIZES)
    parser.add_argument("--layouts", nargs="+", default=["single", "expert_parallel_x2"], choices=LAYOUTS)
    parser.add_argument("--extra", nargs="*", default=[], help="override sets measured as further cases")
    parser.add_argument("--out", default="memory_plan", help="name of the JSON result in benchmarks/results/")
    parser.add_argument("--replan", metavar="JSON", help="no runs: the plan of an earlier result's cases, against "
                        "its measured peaks (after a change to the plan)")
    args = parser.parse_args()
    load_before = loadavg()
    baseline = process_baseline()  # measured (or cached) before the runs load the machine
    if args.replan:
        report(replan(args.replan), {"args": vars(args), "baseline": baseline.__dict__, "replanned": args.replan,
                                     "measured": json.loads(Path(args.replan).read_text())["args"]}, args.out)
        return
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
                    peaks = measure(overrides(size, layout, extra, args.steps), layout, args.steps)
                    rows.append(row(size, layout, extra, args.steps, peaks))
                    print_table(rows[-1:], ["size", "layout", "extra", "plan_mib", "measured_mib", "error_pct"])
    report(rows, {"args": vars(args), "baseline": baseline.__dict__,
                  "ray_worker_mib": worker_mib if ray_layouts else None, "loadavg_before": load_before,
                  "loadavg_after": loadavg()}, args.out)


def report(rows: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    print_table(rows, ["size", "layout", "extra", "params_m", "plan_mib", "measured_mib", "error_pct",
                       "within_target"])
    worst = max(r["worst_error"] for r in rows)
    print(f"worst |plan - measured| / measured: {100 * worst:.1f} % (target {100 * TARGET:.0f} %)")
    print(write_json(out, {**meta, "rows": rows}))


if __name__ == "__main__":
    main()
