"""Full training step time as the expert count grows at fixed top-k (equal active FLOPs per token).

    .venv/bin/python -m benchmarks.expert_scaling [--experts 8 16 32 64 128] [--steps 20] [--warmup 5]
        [--threads 1] [--overrides model.d_model=256 ...]

One process, ``strategy=single`` (``moe_trainer.engine.LocalEngine``), the default model
(4 layers, d_model 128, ``moe.top_k=2``, ``moe.expert_hidden=256``, batch 16 x 128
tokens, dropless) with ``moe.num_experts`` varied; ``--overrides`` are Hydra overrides
applied to every row (e.g. ``moe.capacity_factor=1.25``). Active FLOPs per token do not
change with the expert count, only the number of (smaller) per-expert matmuls, the
router's width and the expert parameters (and their AdamW state).

All engines are built first and stepped round-robin, ``--chunk`` steps at a time, so
background load hits every row alike. Step time is the trainer's own ``step_time_s``
(batch, forward, backward, clip, AdamW step); reported: median over the steps after
each engine's first ``--warmup``, and the ratio to the first (smallest) expert count.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import config, loadavg, print_table, write_json
from moe_trainer.engine import LocalEngine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 16, 32, 64, 128])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20, help="measured steps per expert count")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--chunk", type=int, default=5, help="steps per engine per round-robin turn")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core box)")
    parser.add_argument("--overrides", nargs="*", default=[], help="Hydra overrides for every row")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    t0 = time.perf_counter()

    engines: dict[int, LocalEngine] = {}
    info: dict[int, dict[str, Any]] = {}
    for experts in args.experts:
        cfg, _ = config([f"moe.num_experts={experts}", f"moe.top_k={args.top_k}", "logger.mode=disabled",
                         "logger.progress=false", *args.overrides])
        engines[experts] = LocalEngine(cfg)
        info[experts] = {**engine_info(engines[experts]), "tokens_per_step": cfg.train.batch_size * cfg.data.seq_len,
                         "d_model": cfg.model.d_model, "expert_hidden": cfg.moe.expert_hidden}

    records: dict[int, list[dict[str, Any]]] = {e: [] for e in args.experts}
    total = args.warmup + args.steps
    while any(len(r) < total for r in records.values()):
        for experts, engine in engines.items():
            n = min(args.chunk, total - len(records[experts]))
            if n > 0:
                records[experts] += engine.train(n)
        done = min(len(r) for r in records.values())
        print(f"steps done per engine: {done}/{total}", flush=True)

    rows = []
    for experts in args.experts:
        times = [r["step_time_s"] for r in records[experts][args.warmup:]]
        rows.append({"experts": experts, "top_k": args.top_k, **info[experts],
                     "median_step_s": statistics.median(times), "min_step_s": min(times),
                     "p75_step_s": sorted(times)[(3 * len(times)) // 4],
                     "tokens_per_s": info[experts]["tokens_per_step"] / statistics.median(times),
                     "final_loss": records[experts][-1]["loss"]})
    base = rows[0]["median_step_s"]
    for r in rows:
        r["ratio_to_first"] = r["median_step_s"] / base
    print_table(rows, ["experts", "top_k", "params_experts", "median_step_s", "min_step_s", "p75_step_s",
                       "tokens_per_s", "ratio_to_first"])
    target = next((r["ratio_to_first"] for r in rows if r["experts"] == 128), None)
    goal = {"target": f"step time at 128 experts <= 1.3x the {args.experts[0]}-expert step",
            "ratio": target, "holds": None if target is None or args.experts[0] != 8 else target <= 1.3}
    print_table([goal], ["target", "ratio", "holds"])
    print(write_json("expert_scaling", {"args": vars(args), "threads": torch.get_num_threads(), "rows": rows,
                                        "targets": [goal], "wall_s": time.perf_counter() - t0,
                                        "loadavg_start": load_start, "loadavg_end": loadavg()}))


def engine_info(engine: LocalEngine) -> dict[str, Any]:
    got = engine.info()
    return {"params_total": got["params_total"], "params_active": got["params_active"],
            "params_experts": got["params_experts"]}


if __name__ == "__main__":
    main()
