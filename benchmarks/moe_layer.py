"""MoE layer forward+backward time, ours vs DeepSpeed's ``deepspeed.moe.layer.MoE``, expert-parallel over 2 ranks.

    .venv/bin/python -m benchmarks.moe_layer [--experts 8 32 128] [--tokens 2048 8192]
        [--d-model 256] [--expert-hidden 512] [--iters 10] [--warmup 3] [--no-ds-dropless] [--a2a-chunks 2]
        [--precision fp32|bf16] [--malloc retain|default] [--tag NAME] [--quick]

Two spawned processes, one thread each, join one gloo group through
``moe_trainer.parallel.comm.init_process_group`` (``deepspeed.init_distributed``);
both layers live in the same processes and use the same group. Experts are sharded
(ep_size=2: each rank holds half).

- ours: ``MoELayer`` with ``AllToAllTransport`` over the 2-rank group,
  ``expert_range`` = this rank's half; SwiGLU experts (stacked weights). With
  ``--a2a-chunks C`` (> 1) one more row runs the same layer with
  ``ChunkedAllToAllTransport`` (``parallel.a2a_chunks=C``), capacity mode.
- DeepSpeed: ``MoE(hidden, expert=SwiGLU, num_experts, ep_size=2, k=2, ...)`` with
  ``use_rts=False``, ``top2_2nd_expert_sampling=False`` (deterministic top-2, no Gumbel
  noise), ``min_capacity=4``, ``drop_tokens=True``; its expert is our dense ``SwiGLU``
  module (the shared-expert one), exactly our expert's FLOPs (``D->2F``, ``silu(gate)*up``,
  ``F->D``, no biases).

Same router weights and expert weights (copied from ours into DeepSpeed's modules), same
inputs, so both pick the same experts and, in capacity mode, drop the same assignments
(capacity ``ceil(cf * tokens * k / E)`` per rank in both, first choices before second
choices). Checked once per configuration in capacity mode: drops are counted on both
sides (``dropped``, summed over ranks) and the outputs of tokens that kept all k
assignments are compared (``max_abs_diff``, max over ranks). One
known semantic difference: DeepSpeed renormalises a token's gate weights over the
assignments that survived capacity, ours normalises before drops.

Each iteration runs every variant once (interleaved, so background load hits them
alike), after a barrier; a variant's time is the slowest rank's forward + backward
(input gradient included, the loss is ``sum(y * g) + 0.01 * aux``). Reported: median over
``--iters`` iterations after ``--warmup``. ``ratio`` = DeepSpeed capacity-mode median /
this row's median (> 1: ours faster); ``ratio_paired`` = median over iterations of the
same-iteration ratio (steadier when other processes share the cores).

``--precision bf16``: both layers run under ``torch.autocast("cpu", torch.bfloat16)``
(fp32 master weights, inputs and input gradients; the expert matmuls in bf16 on both
sides), and ``floor_ms`` uses the bf16 2048x2048 matmul rate. ``--quick``: 8 and 128
experts, 2048 tokens per rank, 6 iterations after 2, no DeepSpeed dropless or overlap row
(well under a minute; its JSON name ends in ``_quick``). ``--tag``: appended to the JSON
name (wider-expert configurations).

Both processes keep freed memory in the heap (``moe_trainer.host_memory``, what the
trainer does by default), which applies to both layers alike; ``--malloc default``
leaves glibc's defaults (what a DeepSpeed user gets) for both instead. ``floor_ms``: the expert
matmul FLOPs of the row (forward + backward, rows actually computed) at the 2048x2048
matmul rate measured in the same process: no implementation of that row can be faster.
``page_faults``: minor page faults per iteration (median, the larger rank): memory the
allocator had to fetch from the kernel again, the cost ``--malloc default`` exposes.
"""

from __future__ import annotations

import argparse
import logging
import resource
import statistics
import time
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.common import loadavg, print_table, square_matmul_flops, write_json
from benchmarks.procs import run_ranks, timed_after_barrier
from moe_trainer.model.layers import SwiGLU


def _rows_hook(store: dict[str, int], key: str, lead_dims: int) -> Any:
    def hook(_module: nn.Module, inputs: tuple[Tensor, ...], _out: Any) -> None:
        store[key] = int(torch.tensor(inputs[0].shape[:lead_dims]).prod())
    return hook


def bench_config(rank: int, world: int, group: Any, experts: int, tokens: int, args: dict[str, Any]) -> list[dict]:
    import torch.distributed as tdist
    from deepspeed.moe.layer import MoE

    from moe_trainer.config.schema import MoEConfig
    from moe_trainer.moe.dispatcher import Dispatcher, plan_dispatch
    from moe_trainer.moe.layer import MoELayer
    from moe_trainer.parallel.dispatcher import AllToAllTransport
    from moe_trainer.parallel.overlap import ChunkedAllToAllTransport

    d, hidden, k, cf = args["d_model"], args["expert_hidden"], args["top_k"], args["capacity_factor"]
    local = experts // world
    torch.manual_seed(0)  # same router on every rank (it is replicated); experts: this rank's shard
    # the per-group aux loss, computed inside the layer like DeepSpeed's gate loss (same work)
    cfg = MoEConfig(num_experts=experts, top_k=k, expert_hidden=hidden, capacity_factor=cf, aux_loss_scope="group")
    ours = MoELayer(d, cfg, dispatcher=Dispatcher(experts, cf, AllToAllTransport(group, world, rank, experts)),
                    expert_range=(rank * local, local))
    ds = MoE(d, SwiGLU(d, hidden), num_experts=experts, ep_size=world, k=k, capacity_factor=cf,
             eval_capacity_factor=cf, min_capacity=4, drop_tokens=True, use_rts=False,
             top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()  # creates (once) / attaches DeepSpeed's "ep_size_2" expert-parallel group
    with torch.no_grad():
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_up.weight.copy_(ours.experts.w_gate_up_EDF2[e].t())
            expert.down.weight.copy_(ours.experts.w_down_EFD[e].t())
    gen = torch.Generator().manual_seed(1000 + rank)
    x = torch.randn(tokens, d, generator=gen).requires_grad_(True)
    g = torch.randn(tokens, d, generator=gen)

    rows_seen: dict[str, int] = {}
    ours.experts.register_forward_hook(_rows_hook(rows_seen, "ours", 1))
    ds.deepspeed_moe.experts.register_forward_hook(_rows_hook(rows_seen, "ds", 3))  # [ep, local, capacity, D]

    # one checked forward: same drops, same outputs where nothing was dropped
    with torch.no_grad():
        routing = ours.router(x)
        plan = plan_dispatch(routing, experts, 1, tokens, cf)
        full_T = torch.bincount(plan.token_idx_N, minlength=tokens) == k
        ds_gate = ds.deepspeed_moe.gate(x, None, True)
        ds_dropped = int((ds_gate[3] < 0).sum())
        y_ours, _ = ours(x[None], 1)
        y_ds, _, _ = ds(x)
        diff = float((y_ours[0] - y_ds)[full_T].abs().max()) if bool(full_T.any()) else float("nan")
        scale = float(y_ours.abs().max())
    check = torch.tensor([float(plan.dropped), float(ds_dropped), diff, scale])
    tdist.all_reduce(check[:2], group=group)
    tdist.all_reduce(check[2:], op=tdist.ReduceOp.MAX, group=group)

    plain = ours.dispatcher
    chunks = args["a2a_chunks"]
    overlapped = (Dispatcher(experts, cf, ChunkedAllToAllTransport(group, world, rank, experts, chunks))
                  if chunks > 1 else None)

    bf16 = args["precision"] == "bf16"

    def run_ours(capacity: float | None, dispatcher: Any = plain) -> None:
        ours.dispatcher = dispatcher
        ours.dispatcher.capacity_factor = capacity
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, stats = ours(x[None], 1)
            loss = (y[0].float() * g).sum() + 0.01 * stats.aux_loss
        loss.backward()

    def run_ds(drop: bool) -> None:
        ds.deepspeed_moe.gate.drop_tokens = drop
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y, l_aux, _ = ds(x)
            loss = (y.float() * g).sum() + 0.01 * l_aux
        loss.backward()

    variants: list[tuple[str, str, Any]] = [
        ("ours", f"capacity {cf}", lambda: run_ours(cf)),
        ("ours", "dropless", lambda: run_ours(None)),
        ("deepspeed", f"capacity {cf}", lambda: run_ds(True)),
    ]
    if overlapped is not None:
        variants.append(("ours", f"capacity {cf}, overlap {chunks}", lambda: run_ours(cf, overlapped)))
    if args["ds_dropless"]:
        variants.append(("deepspeed", "dropless", lambda: run_ds(False)))
    iters, warmup = args["iters"], args["warmup"]
    times = torch.zeros(len(variants), iters, dtype=torch.float64)
    expert_rows = torch.zeros(len(variants), dtype=torch.float64)
    faults = torch.zeros(len(variants), iters, dtype=torch.float64)  # minor page faults (fresh memory touched)
    for it in range(warmup + iters):
        for v, (impl, _, fn) in enumerate(variants):
            ours.zero_grad(set_to_none=True)
            ds.zero_grad(set_to_none=True)
            x.grad = None
            flt = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            dt = timed_after_barrier(fn, group)
            if it >= warmup:
                times[v, it - warmup] = dt
                faults[v, it - warmup] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - flt
            # the overlapped path calls no expert module (no hook): it computes the capacity row's plan
            expert_rows[v] = expert_rows[0] if "overlap" in variants[v][1] else rows_seen[
                "ours" if impl == "ours" else "ds"]
    tdist.all_reduce(times, op=tdist.ReduceOp.MAX, group=group)  # a step lasts as long as its slowest rank
    tdist.all_reduce(expert_rows, group=group)
    tdist.all_reduce(faults, op=tdist.ReduceOp.MAX, group=group)
    out = []
    flops_per_row = 3 * (2 * d * 2 * hidden + 2 * hidden * d)  # forward + backward (2x) of both matmuls
    ds_v = next(v for v, (impl, mode, _) in enumerate(variants) if impl == "deepspeed" and mode.startswith("capacity"))
    for v, (impl, mode, _) in enumerate(variants):
        ms = sorted(float(t) * 1e3 for t in times[v])
        out.append({"experts": experts, "tokens_per_rank": tokens, "impl": impl, "mode": mode,
                    "median_ms": statistics.median(ms), "min_ms": ms[0], "p25_ms": ms[len(ms) // 4],
                    "p75_ms": ms[(3 * len(ms)) // 4],
                    # same-iteration ratios: the variants ran back to back, so slow phases of the box cancel
                    "ratio_paired": statistics.median((times[ds_v] / times[v]).tolist()),
                    "expert_rows_per_rank": float(expert_rows[v]) / world,
                    "floor_ms": float(expert_rows[v]) / world * flops_per_row / args["matmul_flops"] * 1e3,
                    "page_faults": float(faults[v].median()),
                    "dropped": 0 if mode == "dropless" else int(check[0]) if impl == "ours" else int(check[1]),
                    "max_abs_diff": float(check[2]), "out_scale": float(check[3])})
    ds_ms = next(r["median_ms"] for r in out if r["impl"] == "deepspeed" and r["mode"].startswith("capacity"))
    for r in out:
        r["ratio"] = ds_ms / r["median_ms"]
    return out


def rank_main(rank: int, world: int, port: int, args: dict[str, Any]) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    from deepspeed.utils import logger as ds_logger

    from moe_trainer.host_memory import retain_freed_memory
    from moe_trainer.parallel.comm import init_process_group, new_group

    if args["malloc"] == "retain":
        retain_freed_memory()
    dtype = torch.bfloat16 if args["precision"] == "bf16" else torch.float32
    args = {**args, "matmul_flops": square_matmul_flops(dtype=dtype)}
    ds_logger.setLevel(logging.WARNING)
    init_process_group("gloo", "127.0.0.1", port, rank, world, args["timeout_s"])
    group = new_group(list(range(world)), args["timeout_s"])
    rows: list[dict[str, Any]] = []
    for experts in args["experts"]:
        for tokens in args["tokens"]:
            t0 = time.perf_counter()
            rows += bench_config(rank, world, group, experts, tokens, args)
            if rank == 0:
                print(f"done: {experts} experts, {tokens} tokens/rank ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for experts, tokens, want in [(8, 2048, 1.2), (128, 2048, 2.0)]:
        got = next((r["ratio"] for r in rows if r["impl"] == "ours" and r["mode"].startswith("capacity")
                    and r["experts"] == experts and r["tokens_per_rank"] == tokens), None)
        paired = next((r["ratio_paired"] for r in rows if r["impl"] == "ours" and r["mode"].startswith("capacity")
                       and r["experts"] == experts and r["tokens_per_rank"] == tokens), None)
        out.append({"target": f"ours capacity >= {want}x faster than DeepSpeed at {experts} experts, {tokens} tokens",
                    "ratio": got, "ratio_paired": paired, "holds": None if got is None else got >= want})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192], help="tokens per rank")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-ds-dropless", dest="ds_dropless", action="store_false",
                        help="leave out DeepSpeed's dropless row (drop_tokens=False)")
    parser.add_argument("--a2a-chunks", type=int, default=2,
                        help="chunks of the overlapped variant (parallel.a2a_chunks); 1 leaves it out")
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain",
                        help="retain: freed memory stays in the heap (the trainer's default); default: glibc's")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16: both layers under torch.autocast(cpu, bfloat16)")
    parser.add_argument("--tag", default="", help="appended to the JSON result's name")
    parser.add_argument("--quick", action="store_true", help="8 and 128 experts, 2048 tokens, 6 iterations")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    args = vars(parser.parse_args())
    if args["quick"]:
        args.update(experts=[8, 128], tokens=[2048], iters=6, warmup=2, ds_dropless=False, a2a_chunks=1)
    if args["top_k"] != 2:
        print("note: k != 2 uses DeepSpeed's topkgating, whose drop policy ('probs') differs from ours")
    load_start = loadavg()
    t0 = time.perf_counter()
    rows = run_ranks(rank_main, 2, args)[0]
    print_table(rows, ["experts", "tokens_per_rank", "impl", "mode", "median_ms", "min_ms", "p25_ms", "p75_ms",
                       "ratio", "ratio_paired", "floor_ms", "expert_rows_per_rank", "page_faults", "dropped",
                       "max_abs_diff"])
    goals = targets(rows)
    print_table(goals, ["target", "ratio", "ratio_paired", "holds"])
    name = "moe_layer" + ("" if args["malloc"] == "retain" else "_default_malloc") + (
        "_bf16" if args["precision"] == "bf16" else "") + (f"_{args['tag']}" if args["tag"] else "") + (
        "_quick" if args["quick"] else "")
    print(write_json(name, {"args": args, "processes": 2, "threads_per_process": 1, "rows": rows,
                                   "targets": goals, "wall_s": time.perf_counter() - t0,
                                   "loadavg_start": load_start, "loadavg_end": loadavg()}))


if __name__ == "__main__":
    main()
