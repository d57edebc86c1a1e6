"""Expert FLOP/s as a share of the same process's measured matmul FLOP/s (a CPU stand-in for MFU).

    .venv/bin/python -m benchmarks.mfu [--d-model 128 256 512] [--hidden-ratio 2] [--experts 8 64]
        [--tokens 2048] [--iters 10] [--threads 1] [--square 2048]

One process, ``--threads`` torch threads. Three timings per configuration, all in this
process, interleaved per iteration, median over ``--iters`` after 2 warmups:

- ``square``: one ``torch.mm`` of two ``--square`` x ``--square`` fp32 matrices (the
  machine's achieved matmul FLOP/s; measured once per configuration, best of the runs' medians).
- ``shapes``: exactly the matmuls a SwiGLU expert shard performs on these rows, as plain
  ``torch.mm(..., out=...)`` on preallocated operands: per expert, forward ``x W_gu``
  ``[n,D]x[D,2F]`` and ``h W_d`` ``[n,F]x[F,D]``, backward ``dy W_d^T``, ``h^T dy``,
  ``da W_gu^T``, ``x^T da`` (what BLAS can do at these shapes, nothing else).
- ``experts``: ``SwiGLUExperts`` forward + backward (``y.backward(g)``, input gradient
  included, gradients set to None between iterations as the trainer does) on realistic
  dispatched rows: ``--tokens`` random tokens routed top-2 by a fresh ``Router`` over
  ``--experts`` experts, permuted by the local ``Dispatcher`` (dropless), so expert runs
  have the router's uneven lengths.

FLOPs of a SwiGLU expert on n rows: forward ``2 n D 2F + 2 n F D``; backward 2x forward;
``F = hidden_ratio * D`` (the pre-2026-12-04 default model, ``benchmarks.common.OLD_DEFAULT``:
D 128, F 256). Elementwise work (SiLU,
gating product) is not counted. Reported: GFLOP/s of each and
``experts / square`` (the MFU stand-in; ``experts_over_peak`` uses the best square
matmul of the whole run, steadier on a shared box) and ``experts / shapes`` (what the
expert code loses against BLAS at the same shapes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import loadavg, print_table, write_json
from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.moe.router import Router


def timed(fns: list[Callable[[], None]], iters: int, warmup: int = 2,
          before: Callable[[], None] | None = None) -> list[float]:
    """Median seconds of each function, interleaved per iteration."""
    times: list[list[float]] = [[] for _ in fns]
    for it in range(warmup + iters):
        for i, fn in enumerate(fns):
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if it >= warmup:
                times[i].append(dt)
    return [statistics.median(t) for t in times]


def shape_matmuls(counts: list[int], d: int, f: int) -> Callable[[], None]:
    """The six matmuls per expert of a SwiGLU forward + backward, on preallocated tensors."""
    ops: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for n in counts:
        x, w_gu, w_d = torch.randn(n, d), torch.randn(d, 2 * f), torch.randn(f, d)
        h, dy, da = torch.randn(n, f), torch.randn(n, d), torch.randn(n, 2 * f)
        ops += [(x, w_gu, torch.empty(n, 2 * f)), (h, w_d, torch.empty(n, d)),  # forward
                (dy, w_d.t(), torch.empty(n, f)), (h.t(), dy, torch.empty(f, d)),  # backward through w_down
                (da, w_gu.t(), torch.empty(n, d)), (x.t(), da, torch.empty(d, 2 * f))]  # backward through w_gate_up

    def run() -> None:
        for a, b, out in ops:
            torch.mm(a, b, out=out)
    return run


def measure(d: int, f: int, experts: int, tokens: int, iters: int, square: int) -> dict[str, Any]:
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=experts, top_k=2, expert_hidden=f)
    router = Router(d, cfg)
    x = torch.randn(tokens, d)
    with torch.no_grad():
        dispatched = Dispatcher(experts, None).dispatch(x, router(x), 1)
    counts = dispatched.tokens_per_expert_E
    rows = int(counts.sum())
    module = SwiGLUExperts(experts, d, f)
    x_nd = dispatched.x_ND.detach().clone().requires_grad_(True)
    grad = torch.randn(rows, d)

    def experts_fwd_bwd() -> None:
        module(x_nd, counts).backward(grad)

    def zero() -> None:
        module.zero_grad(set_to_none=True)
        x_nd.grad = None

    a, b, c = torch.randn(square, square), torch.randn(square, square), torch.empty(square, square)

    def square_mm() -> None:
        torch.mm(a, b, out=c)

    exp_s, shapes_s, square_s = timed([experts_fwd_bwd, shape_matmuls(counts.tolist(), d, f), square_mm], iters,
                                      before=zero)
    flops = 3 * (2 * rows * d * 2 * f + 2 * rows * f * d)
    square_flops = 2 * square**3
    return {"d_model": d, "expert_hidden": f, "experts": experts, "tokens": tokens, "rows": rows,
            "rows_per_expert_min": int(counts.min()), "rows_per_expert_max": int(counts.max()),
            "gflop": flops / 1e9, "experts_ms": exp_s * 1e3, "shapes_ms": shapes_s * 1e3,
            "experts_gflop_s": flops / exp_s / 1e9, "shapes_gflop_s": flops / shapes_s / 1e9,
            "square_gflop_s": square_flops / square_s / 1e9,
            "experts_over_square": (flops / exp_s) / (square_flops / square_s),
            "experts_over_shapes": shapes_s / exp_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--hidden-ratio", type=float, default=2.0, help="expert hidden F = ratio * d_model")
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--tokens", type=int, default=2048,
                        help="tokens routed top-2 (the pre-2026-12-04 default batch: 16 x 128)")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--square", type=int, default=2048, help="side of the reference square matmul")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_start = loadavg()
    t0 = time.perf_counter()
    rows = []
    for d in args.d_model:
        for experts in args.experts:
            rows.append(measure(d, int(args.hidden_ratio * d), experts, args.tokens, args.iters, args.square))
            print(f"done: d_model {d}, {experts} experts", flush=True)
    peak = max(r["square_gflop_s"] for r in rows)
    for r in rows:
        r["experts_over_peak"] = r["experts_gflop_s"] / peak
    print(f"square {args.square} matmul, best median over configurations: {peak:.1f} GFLOP/s "
          f"({args.threads} thread{'s' if args.threads > 1 else ''})")
    print_table(rows, ["d_model", "expert_hidden", "experts", "rows", "rows_per_expert_min", "rows_per_expert_max",
                       "gflop", "experts_ms", "shapes_ms", "experts_gflop_s", "shapes_gflop_s", "square_gflop_s",
                       "experts_over_square", "experts_over_peak", "experts_over_shapes"])
    print(write_json("mfu", {"args": vars(args), "threads": torch.get_num_threads(), "square_gflop_s_best": peak,
                             "rows": rows, "wall_s": time.perf_counter() - t0,
                             "loadavg_start": load_start, "loadavg_end": loadavg()}))


if __name__ == "__main__":
    main()
