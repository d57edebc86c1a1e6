"""``train.precision``: bf16 vs fp32 tokens/s and final val_loss of the (pre-2026-12-04) default run, side by side.

    python benchmarks/precision.py [--steps 300] [--chunk 10] [--warmup 20] [--strategy expert_parallel]

The pre-2026-12-04 default model (``benchmarks.common.OLD_DEFAULT``, what docs/benchmarks.md
measured) and the default data, ``--processes`` Ray actors with one
thread each (``single``: one process with that many threads, no Ray). Both runs are built
up front and train in alternating chunks of ``--chunk`` steps, so load from other processes
on a shared machine hits both alike; the speed-up is the ratio of their median per-step
tokens/s after ``--warmup`` steps. After ``--steps`` steps (300, the default schedule) each
is evaluated as the driver's final evaluation does. Writes benchmarks/results/precision.json.
"""

from __future__ import annotations

import argparse
import statistics
from typing import Any

import ray
import torch

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from moe_trainer.config.validate import validate
from moe_trainer.engine import Engine, LocalEngine

PRECISIONS = ("fp32", "bf16")


def build(strategy: str, processes: int, precision: str, steps: int) -> Engine:
    overrides = [*OLD_DEFAULT, f"parallel={strategy}", f"train.precision={precision}", f"train.max_steps={steps}",
                 "logger.mode=disabled", "parallel.cpus_per_actor=1"]
    if strategy in ("data_parallel", "expert_parallel"):
        overrides.append(f"parallel.num_actors={processes}")
    cfg, _ = config(overrides)
    validate(cfg)
    if strategy == "single":
        return LocalEngine(cfg)
    from actors.engine import RayEngine

    return RayEngine(cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--strategy", default="expert_parallel", choices=["single", "data_parallel",
                                                                          "expert_parallel"])
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    if args.strategy == "single":
        torch.set_num_threads(args.processes)
    else:
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
                 num_cpus=2 * args.processes)
    engines = {p: build(args.strategy, args.processes, p, args.steps) for p in PRECISIONS}
    initial = {p: e.evaluate() for p, e in engines.items()}
    records: dict[str, list[dict[str, Any]]] = {p: [] for p in PRECISIONS}
    load = [loadavg()]
    done = 0
    while done < args.steps:
        n = min(args.chunk, args.steps - done)
        for p, engine in engines.items():
            records[p].extend(engine.train(n))
        done += n
        load.append(loadavg())
    rows = []
    for p, engine in engines.items():
        steady = records[p][args.warmup:]
        per_step = [r["tokens_step"] / r.get("step_time_s_max", r["step_time_s"]) for r in steady]
        rows.append({"precision": p, "tokens_per_s_median": statistics.median(per_step),
                     "tokens_per_s_mean": statistics.fmean(per_step),
                     "step_time_s_median": statistics.median(r.get("step_time_s_max", r["step_time_s"])
                                                             for r in steady),
                     "a2a_time_s_mean": statistics.fmean(r.get("a2a_time_s", 0.0) for r in steady),
                     "a2a_bytes_per_step": statistics.fmean(r.get("a2a_bytes_sent", 0.0) for r in steady),
                     "initial_val_loss": initial[p], "final_val_loss": engine.evaluate(),
                     "final_train_loss": records[p][-1]["loss"]})
        engine.close()
    if args.strategy != "single":
        ray.shutdown()
    fp32, bf16 = rows
    summary = {"speedup_median": bf16["tokens_per_s_median"] / fp32["tokens_per_s_median"],
               "val_loss_rel_diff": bf16["final_val_loss"] / fp32["final_val_loss"] - 1}
    print_table(rows, list(rows[0]))
    print(", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    print(write_json("precision", {"args": vars(args), "rows": rows, **summary, "loadavg": load}))


if __name__ == "__main__":
    main()
