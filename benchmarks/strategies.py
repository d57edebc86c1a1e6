"""Throughput, communication share and per-role idle time of the Ray strategies at equal process counts.

    python benchmarks/strategies.py [--steps 30] [--processes 2 4]

Runs each configuration through the same driver ``moe-train`` uses (embedded local
Ray, the pre-2026-12-04 default model ``benchmarks.common.OLD_DEFAULT``, W&B off) and reads the
per-step records. Steady state: the first
``--warmup`` steps are left out of the means. Per process count N: ``single`` (one
process with N torch threads, no Ray), ``data_parallel`` xN, ``expert_parallel`` xN
(plain and with ``parallel.micro_batches=2``), ``disaggregated`` N/2 coordinators +
N/2 expert actors (1, 2 and 4 micro-batches); one CPU (one thread) per actor.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from benchmarks.common import OLD_DEFAULT, config, print_table, write_json
from moe_trainer.config.validate import validate
from moe_trainer.driver import run_training
from moe_trainer.engine import Engine, LocalEngine
from moe_trainer.outputs import RunOutputs


def layouts(processes: int) -> list[tuple[str, list[str]]]:
    coords = processes // 2
    experts = processes - coords
    disagg = ["parallel=disaggregated", f"parallel.num_coordinators={coords}", f"parallel.num_expert_actors={experts}"]
    return [
        (f"single, {processes} threads", ["parallel=single"]),
        (f"data_parallel x{processes}", ["parallel=data_parallel", f"parallel.num_actors={processes}"]),
        (f"expert_parallel x{processes}", ["parallel=expert_parallel", f"parallel.num_actors={processes}"]),
        (f"expert_parallel x{processes} mb=2", ["parallel=expert_parallel", f"parallel.num_actors={processes}",
                                                 "parallel.micro_batches=2"]),
        *[(f"disaggregated {coords}c+{experts}e mb={mb}", [*disagg, f"parallel.micro_batches={mb}"])
          for mb in (1, 2, 4)],
    ]


def measure(name: str, overrides: list[str], steps: int, warmup: int, cpus: float,
            processes: int) -> dict[str, Any]:
    from actors.engine import RayEngine

    cfg, resolved = config([*OLD_DEFAULT, *overrides, f"train.max_steps={steps}", f"train.eval_every={steps}",
                            "train.eval_batches=1", "train.checkpoint_every=0", "train.log_every=1",
                            "logger.mode=disabled", "logger.progress=false", f"parallel.cpus_per_actor={cpus}"])
    validate(cfg)
    if cfg.parallel.strategy == "single":
        torch.set_num_threads(processes)
    engine: Engine = LocalEngine(cfg) if cfg.parallel.strategy == "single" else RayEngine(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        outputs = RunOutputs(Path(tmp), resolved, cfg.logger, cfg.parallel.strategy)
        records: list[dict[str, Any]] = []
        original = engine.train

        def recording(n: int) -> list[dict[str, Any]]:
            out = original(n)
            records.extend(out)
            return out

        engine.train = recording  # type: ignore[method-assign]
        try:
            run_training(cfg, engine, outputs)
        finally:
            outputs.close()
            engine.close()
    steady = records[warmup:]

    def mean(key: str) -> float:
        values = [r[key] for r in steady if key in r]
        return statistics.fmean(values) if values else float("nan")

    step_time = mean("step_time_s_max")
    return {
        "name": name, "processes": processes,
        "tokens_per_s": statistics.fmean(r["tokens_step"] / r["step_time_s_max"] for r in steady),
        "step_time_s": step_time,
        "a2a_share": mean("a2a_time_s") / step_time,
        "coord_idle_share": mean("coord_idle_share"),
        "expert_idle_share": mean("expert_idle_share"),
        "coord_busy_s": mean("coord_busy_s"),
        "expert_busy_s": mean("expert_busy_s_max"),
        # work done at the same time by both roles: what pipelining hides (0 when strictly sequential)
        "overlap_s": max(0.0, mean("coord_busy_s") + mean("expert_busy_s_max") - step_time),
        "final_loss": records[-1]["loss"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--processes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--only", nargs="+", default=[], metavar="TEXT",
                        help="only layouts whose name contains one of these, e.g. disaggregated 'expert_parallel x2'")
    args = parser.parse_args()
    ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False,
             num_cpus=max(args.processes))
    rows = []
    for processes in args.processes:
        for name, overrides in layouts(processes):
            if args.only and not any(text in name for text in args.only):
                continue
            rows.append(measure(name, overrides, args.steps, args.warmup, cpus=1.0, processes=processes))
            print(f"done: {name}", flush=True)
    ray.shutdown()
    print_table(rows, ["name", "tokens_per_s", "step_time_s", "a2a_share", "coord_idle_share", "expert_idle_share",
                       "coord_busy_s", "expert_busy_s", "overlap_s", "final_loss"])
    print(write_json("strategies", {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
