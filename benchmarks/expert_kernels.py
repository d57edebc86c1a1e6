"""Expert layer forward+backward: grouped GEMM kernels vs the per-expert loop, fp32 and bf16, 8 to 128 experts.

    .venv/bin/python -m benchmarks.expert_kernels [--experts 8 32 128] [--shapes 128x256 256x512]
        [--rows 4096] [--iters 20] [--warmup 3] [--malloc retain|default] [--quick]

One process, one thread. ``SwiGLUExperts`` with fp32 master weights on ``--rows`` rows
(tokens x top-k; 4096 = the 2048 tokens of the pre-2026-12-04 default model,
``benchmarks.common.OLD_DEFAULT``, at top-2) spread over the experts
by a random balanced assignment, rows in fp32 or bf16. Variants, run interleaved (each
iteration runs every variant once, so background load hits them alike):

- ``loop``: one ``torch.mm`` per expert and product (the kernels before issue 14);
- ``grouped``: ``SwiGLUExperts.kernel="auto"``, i.e. ``grouped_mm`` for the forward and
  input-gradient products (weight gradients written per expert into ``.grad`` on CPU,
  see ``moe_trainer/moe/expert_kernels.py``);
- ``grouped, recompute``: the same with ``recompute=True`` (backward recomputes h, s, a).

Time: forward + backward of ``(y * g).sum()`` (input and weight gradients, after
``zero_grad(set_to_none=True)``), median over ``--iters`` after ``--warmup``;
``ratio_paired`` = median of the same-iteration ratio loop / variant (> 1: faster than the
loop). ``floor_ms`` = the expert matmul FLOPs (forward 2 products, backward 4) at the
2048x2048 matmul rate of that dtype measured in this process: no kernel can be faster.
``--quick``: that model's expert shape only (d_model 128, hidden 256), 10 iterations (about a minute).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from benchmarks.common import loadavg, old_default, print_table, square_matmul_flops, write_json
from moe_trainer.host_memory import retain_freed_memory
from moe_trainer.moe.experts import SwiGLUExperts

VARIANTS = [("loop", "loop", False), ("grouped", "auto", False), ("grouped, recompute", "auto", True)]
OLD_DEFAULT_SHAPE = f"{old_default('model.d_model')}x{old_default('moe.expert_hidden')}"  # 128x256


def balanced_counts(rows: int, experts: int, gen: torch.Generator) -> torch.Tensor:
    """Rows per expert of a random assignment with every expert equally likely (what a balanced router gives)."""
    return torch.bincount(torch.randint(experts, (rows,), generator=gen), minlength=experts)


def bench_shape(experts: int, d: int, hidden: int, dtype: torch.dtype, args: dict[str, Any],
                flops_rate: float) -> list[dict[str, Any]]:
    gen = torch.Generator().manual_seed(0)
    counts = balanced_counts(args["rows"], experts, gen)
    x = torch.randn(args["rows"], d, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(args["rows"], d, generator=gen).to(dtype)
    layers = []
    for _, kernel, recompute in VARIANTS:
        torch.manual_seed(0)
        layer = SwiGLUExperts(experts, d, hidden)
        layer.kernel, layer.recompute = kernel, recompute
        layers.append(layer)
    times = [[] for _ in VARIANTS]
    for it in range(args["warmup"] + args["iters"]):
        for v, layer in enumerate(layers):
            layer.zero_grad(set_to_none=True)
            x.grad = None
            t0 = time.perf_counter()
            (layer(x, counts) * g).sum().backward()
            if it >= args["warmup"]:
                times[v].append(time.perf_counter() - t0)
    flops = 3 * (2 * args["rows"] * d * 2 * hidden + 2 * args["rows"] * hidden * d)
    out = []
    for v, (name, _, _) in enumerate(VARIANTS):
        ms = statistics.median(times[v]) * 1e3
        out.append({"experts": experts, "d_model": d, "expert_hidden": hidden, "dtype": str(dtype).split(".")[-1],
                    "variant": name, "median_ms": ms, "min_ms": min(times[v]) * 1e3,
                    "ratio_paired": statistics.median(a / b for a, b in zip(times[0], times[v], strict=True)),
                    "floor_ms": flops / flops_rate * 1e3, "share_of_matmul_rate": flops / flops_rate * 1e3 / ms})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--shapes", nargs="+", default=[OLD_DEFAULT_SHAPE, "256x512"], help="d_model x expert_hidden")
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--malloc", choices=["retain", "default"], default="retain")
    parser.add_argument("--quick", action="store_true")
    args = vars(parser.parse_args())
    if args["quick"]:
        args.update(shapes=[OLD_DEFAULT_SHAPE], iters=10, warmup=2)
    torch.set_num_threads(1)
    if args["malloc"] == "retain":
        retain_freed_memory()
    load_start, t0 = loadavg(), time.perf_counter()
    rates = {dtype: square_matmul_flops(dtype=dtype) for dtype in (torch.float32, torch.bfloat16)}
    rows = []
    for shape in args["shapes"]:
        d, hidden = (int(n) for n in shape.split("x"))
        for experts in args["experts"]:
            for dtype in (torch.float32, torch.bfloat16):
                rows += bench_shape(experts, d, hidden, dtype, args, rates[dtype])
            print(f"done: {experts} experts, {shape}", flush=True)
    print_table(rows, ["experts", "d_model", "expert_hidden", "dtype", "variant", "median_ms", "min_ms",
                       "ratio_paired", "floor_ms", "share_of_matmul_rate"])
    name = "expert_kernels" + ("" if args["malloc"] == "retain" else "_default_malloc")
    print(write_json(name, {"args": args, "threads": 1, "matmul_flops": {str(k): v for k, v in rates.items()},
                            "rows": rows, "wall_s": time.perf_counter() - t0, "loadavg_start": load_start,
                            "loadavg_end": loadavg()}))


if __name__ == "__main__":
    main()
