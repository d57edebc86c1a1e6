"""All-to-all bandwidth of our dispatcher vs raw DeepSpeed all_to_all_single, and the exposed all-to-all
share of an expert-parallel training step; 2 gloo processes, one thread each.

    .venv/bin/python -m benchmarks.comm [--tokens 1024 8192] [--d-model 128 512] [--experts 8]
        [--iters 20] [--steps 20] [--warmup 5] [--base model.d_model=256 ...]
        [--overrides parallel.a2a_chunks=4 [--overrides ...]]

Part 1, bandwidth. Each rank routes its ``--tokens`` random rows with a top-2 router
(``--experts`` experts, half per rank, dropless) and times our ``Dispatcher`` over ``AllToAllTransport``
``dispatch`` + ``combine`` (forward, no experts in between): plan, permute, count exchange,
row all-to-all, regroup, and back. The raw row is two ``deepspeed.comm.all_to_all_single``
calls with exactly the same split sizes on preallocated tensors, i.e. the same bytes on
the wire and nothing else. Bandwidth = bytes this rank sends to the other rank (rows
that stay local are not counted) / time; time = slowest rank, median over ``--iters``
after 3 warmup iterations, variants interleaved. ``a2a_ms`` is the part of our pair spent
inside the two collectives (the dispatcher's own counters; includes the count exchange).

Part 2, exposed communication. Two processes build their ranks with
``moe_trainer.parallel.setup.build_rank`` for ``parallel=expert_parallel
parallel.num_actors=2`` (the pre-2026-12-04 default model, ``benchmarks.common.OLD_DEFAULT``,
unless ``--base`` overrides) and run
``Trainer.train_step``; from the per-step records: ``a2a_time_s`` (time blocked in the
forward and backward all-to-alls, waiting for the peer included) and
``grad_sync_time_s`` as shares of ``step_time_s`` (means over the steps after
``--warmup``; ``_max`` = the slower rank; per-phase all-to-all milliseconds and MiB
sent per step and rank alongside). Rows by default: no overlap; ``parallel.a2a_chunks=2``;
``parallel.micro_batches=2``. Routing groups are whole sequences whatever the layout, so
both overlap rows compute the no-overlap row's function (same loss curve). Every
``--overrides ...`` adds one row with those Hydra overrides on top; an override the
config schema does not know is reported and its row skipped.
The overlap table gives, per overlap row, the relative reduction of the
exposed all-to-all share against its baseline (target: >= 30 %) and the largest
relative difference between the two runs' per-step losses, for each of ``--repeats``
rounds (every row once per round), and the median over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import OLD_DEFAULT, config, loadavg, print_table, write_json
from benchmarks.procs import run_ranks, timed_after_barrier

STEP_OVERRIDES = [*OLD_DEFAULT, "parallel=expert_parallel", "parallel.num_actors=2", "logger.mode=disabled",
                  "logger.progress=false"]


def bandwidth_rank(rank: int, world: int, port: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    import deepspeed.comm as dist
    import torch.distributed as tdist

    from moe_trainer.config.schema import MoEConfig
    from moe_trainer.moe.dispatcher import Dispatcher
    from moe_trainer.moe.router import Router
    from moe_trainer.parallel.comm import init_process_group, new_group
    from moe_trainer.parallel.dispatcher import AllToAllTransport

    init_process_group("gloo", "127.0.0.1", port, rank, world, 300)
    group = new_group(list(range(world)), 300)
    rows = []
    for experts in args["experts"]:
        for d in args["d_model"]:
            for tokens in args["tokens"]:
                torch.manual_seed(0)  # the router is replicated: same weights on every rank
                router = Router(d, MoEConfig(num_experts=experts, top_k=2))
                x = torch.randn(tokens, d, generator=torch.Generator().manual_seed(100 + rank))
                with torch.no_grad():
                    routing = router(x)
                transport = AllToAllTransport(group, world, rank, experts)
                dispatcher = Dispatcher(experts, None, transport)

                def ours(dispatcher: Dispatcher = dispatcher, x: torch.Tensor = x,
                         routing: Any = routing) -> None:
                    dispatched = dispatcher.dispatch(x, routing, 1)
                    dispatcher.combine(dispatched.x_ND, dispatched)

                with torch.no_grad():
                    meta = dispatcher.dispatch(x, routing, 1).comm
                transport.counters.take()
                send, recv = meta.route.send_splits, meta.route.recv_splits
                bufs = [torch.randn(sum(send), d), torch.empty(sum(recv), d), torch.empty(sum(send), d)]

                def raw(send: list[int] = send, recv: list[int] = recv, bufs: list[torch.Tensor] = bufs) -> None:
                    dist.all_to_all_single(bufs[1], bufs[0], output_split_sizes=recv, input_split_sizes=send,
                                           group=group)
                    dist.all_to_all_single(bufs[2], bufs[1], output_split_sizes=send, input_split_sizes=recv,
                                           group=group)

                warm, iters = 3, args["iters"]
                times = torch.zeros(2, iters, dtype=torch.float64)
                a2a = torch.zeros(iters, dtype=torch.float64)
                with torch.no_grad():
                    for it in range(warm + iters):
                        for v, fn in enumerate((ours, raw)):
                            dt = timed_after_barrier(fn, group)
                            if it >= warm:
                                times[v, it - warm] = dt
                        took = transport.counters.take()
                        if it >= warm:
                            a2a[it - warm] = took["a2a_dispatch_time_s"] + took["a2a_combine_time_s"]
                off_rank_rows = sum(send) - send[rank] + sum(recv) - recv[rank]  # dispatch sends, combine returns
                cross = torch.tensor([float(off_rank_rows * d * 4)], dtype=torch.float64)
                tdist.all_reduce(times, op=tdist.ReduceOp.MAX, group=group)
                tdist.all_reduce(a2a, op=tdist.ReduceOp.MAX, group=group)
                tdist.all_reduce(cross, op=tdist.ReduceOp.MAX, group=group)
                ours_s, raw_s = (statistics.median(times[v].tolist()) for v in range(2))
                nbytes = float(cross)  # bytes this rank sends off-rank in dispatch + combine (the larger rank)
                rows.append({"experts": experts, "d_model": d, "tokens_per_rank": tokens, "rows_per_rank": tokens * 2,
                             "mb_sent_per_rank": nbytes / 2**20,
                             "ours_ms": ours_s * 1e3, "ours_a2a_ms": statistics.median(a2a.tolist()) * 1e3,
                             "raw_ms": raw_s * 1e3, "ours_gb_s": nbytes / ours_s / 1e9,
                             "raw_gb_s": nbytes / raw_s / 1e9,
                             "ours_over_raw": ours_s / raw_s})
    return rows


def step_rank(rank: int, world: int, port: int, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    from moe_trainer.parallel.setup import build_rank

    cfg, _ = config(overrides)
    setup = build_rank(cfg, rank, "127.0.0.1", port)
    records = [setup.runner.train_step().record for _ in range(warmup + steps)]
    steady = records[warmup:]

    def mean(key: str) -> float:
        return statistics.fmean(r[key] for r in steady)

    return {"losses": [r["loss"] for r in records],
            "step_time_s": mean("step_time_s"), "a2a_time_s": mean("a2a_time_s"),
            "grad_sync_time_s": mean("grad_sync_time_s"), "a2a_bytes_sent": mean("a2a_bytes_sent"),
            "tokens_step": steady[0]["tokens_step"], "final_loss": records[-1]["loss"],
            **{f"a2a_{p}_time_s": mean(f"a2a_{p}_time_s") for p in ("dispatch", "combine", "dispatch_bwd",
                                                                       "combine_bwd")}}


def step_share(name: str, overrides: list[str], steps: int, warmup: int) -> dict[str, Any]:
    from moe_trainer.config.validate import validate

    try:
        cfg, _ = config(overrides)
        validate(cfg)
    except Exception as err:  # noqa: BLE001 - an unknown/invalid override: report and skip the row
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return {"name": name, "note": f"skipped: {first}"}
    ranks = run_ranks(step_rank, 2, overrides, steps, warmup)
    step = max(r["step_time_s"] for r in ranks)
    row: dict[str, Any] = {"name": name, "overrides": overrides, "tokens_per_s": ranks[0]["tokens_step"] / step,
                           "step_time_s_max": step, "note": ""}
    for key in ("a2a_time_s", "grad_sync_time_s"):
        shares = [r[key] / r["step_time_s"] for r in ranks]
        row[key.replace("time_s", "share")] = statistics.fmean(shares)
        row[key.replace("time_s", "share_max")] = max(shares)
    for key in ("step_time_s", "a2a_time_s", "a2a_dispatch_time_s", "a2a_combine_time_s", "a2a_dispatch_bwd_time_s",
                "a2a_combine_bwd_time_s", "grad_sync_time_s", "a2a_bytes_sent"):
        row[key] = statistics.fmean(r[key] for r in ranks)
    row["a2a_mb_sent"] = row["a2a_bytes_sent"] / 2**20
    for phase in ("dispatch", "combine", "dispatch_bwd", "combine_bwd"):
        row[f"{phase}_ms"] = row[f"a2a_{phase}_time_s"] * 1e3
    row["final_loss"] = ranks[0]["final_loss"]
    row["losses"] = ranks[0]["losses"]
    return row


OVERLAP = [  # (name, overrides, name of the no-overlap row computing the same function)
    ("no overlap", [], None),
    ("a2a_chunks=2", ["parallel.a2a_chunks=2"], "no overlap"),
    ("micro_batches=2", ["parallel.micro_batches=2"], "no overlap"),
]


def overlap_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per overlap row and repeat: reduction of the exposed share against its baseline of the same repeat."""
    out = []
    for repeat in sorted({r["repeat"] for r in rows}):
        out += _overlap_targets([r for r in rows if r["repeat"] == repeat], repeat)
    return out


def _overlap_targets(rows: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    by_name = {r["name"]: r for r in rows if "a2a_share" in r}
    out = []
    for name, _, base_name in OVERLAP:
        if base_name is None or name not in by_name or base_name not in by_name:
            continue
        row, base = by_name[name], by_name[base_name]
        reduction = 1 - row["a2a_share"] / base["a2a_share"]
        loss_diff = max(abs(a - b) / abs(b) for a, b in zip(row["losses"], base["losses"], strict=True))
        out.append({"repeat": repeat, "overlap": name, "baseline": base_name, "base_share": base["a2a_share"],
                    "share": row["a2a_share"], "reduction": reduction,
                    "speedup": base["step_time_s_max"] / row["step_time_s_max"], "loss_max_rel_diff": loss_diff,
                    "holds": reduction >= 0.3 and loss_diff < 1e-4})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1024, 8192], help="tokens per rank (part 1)")
    parser.add_argument("--d-model", type=int, nargs="+", default=[128, 512], help="row width (part 1)")
    parser.add_argument("--experts", type=int, nargs="+", default=[8], help="experts (part 1)")
    parser.add_argument("--iters", type=int, default=20, help="timed iterations (part 1)")
    parser.add_argument("--steps", type=int, default=20, help="measured training steps (part 2)")
    parser.add_argument("--warmup", type=int, default=5, help="training steps left out (part 2)")
    parser.add_argument("--base", nargs="*", default=[], help="Hydra overrides for every part-2 row")
    parser.add_argument("--overrides", nargs="+", action="append", default=[],
                        help="one extra part-2 row with these Hydra overrides (repeatable)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="part-2 rounds (all rows each round): the shares move by a few points run to run")
    parser.add_argument("--skip-bandwidth", action="store_true")
    parser.add_argument("--skip-step", action="store_true")
    args = parser.parse_args()
    load_start = loadavg()
    t0 = time.perf_counter()
    bw_rows: list[dict[str, Any]] = []
    if not args.skip_bandwidth:
        bw_rows = run_ranks(bandwidth_rank, 2, {"tokens": args.tokens, "d_model": args.d_model,
                                                "experts": args.experts, "iters": args.iters})[0]
        print_table(bw_rows, ["experts", "d_model", "tokens_per_rank", "mb_sent_per_rank", "ours_ms", "ours_a2a_ms",
                              "raw_ms", "ours_gb_s", "raw_gb_s", "ours_over_raw"])
    step_rows: list[dict[str, Any]] = []
    if not args.skip_step:
        variants = [(name, extra) for name, extra, _ in OVERLAP] + [(" ".join(o), o) for o in args.overrides]
        for repeat in range(args.repeats):
            for name, extra in variants:
                row = step_share(name, [*STEP_OVERRIDES, *args.base, *extra], args.steps, args.warmup)
                step_rows.append({"repeat": repeat, **row})
                print(f"done: {name} (round {repeat + 1}/{args.repeats})", flush=True)
        print_table(step_rows, ["repeat", "name", "tokens_per_s", "step_time_s", "a2a_time_s", "a2a_share",
                                "a2a_share_max", "dispatch_ms", "combine_ms", "dispatch_bwd_ms", "combine_bwd_ms",
                                "a2a_mb_sent", "grad_sync_share", "note"])
    goals = overlap_targets(step_rows)
    print_table(goals, ["repeat", "overlap", "baseline", "base_share", "share", "reduction", "speedup",
                        "loss_max_rel_diff", "holds"])
    summary = [{"overlap": name, "median_reduction": statistics.median(g["reduction"] for g in goals
                                                                         if g["overlap"] == name),
                "rounds_holding": f"{sum(g['holds'] for g in goals if g['overlap'] == name)}/{args.repeats}"}
               for name in dict.fromkeys(g["overlap"] for g in goals)]
    print_table(summary, ["overlap", "median_reduction", "rounds_holding"])
    print(write_json("comm", {"args": vars(args), "processes": 2, "threads_per_process": 1, "bandwidth": bw_rows,
                              "step": step_rows, "overlap": goals, "overlap_summary": summary,
                              "wall_s": time.perf_counter() - t0,
                              "loadavg_start": load_start, "loadavg_end": loadavg()}))


if __name__ == "__main__":
    main()
