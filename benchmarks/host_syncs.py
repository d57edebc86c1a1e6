"""Host syncs per MoE layer forward + backward, per dispatcher, counted on the CPU.

    .venv/bin/python -m benchmarks.host_syncs [--tokens 64] [--experts 4]

Every point where the host would wait for a GPU (value reads, data-dependent output
shapes, explicit synchronisation; see :mod:`moe_trainer.host_syncs`) in one MoE layer's
forward and backward: the local dispatcher (``single``) and the expert-parallel
dispatchers over a one-rank gloo group (all-to-alls included), dropless and with a
capacity factor. The asynchronous dispatcher runs two micro-batches, so its counts are
for two. ``experts`` is the part in ``moe/experts.py`` / ``moe/expert_kernels.py``.
"""

from __future__ import annotations

import argparse
from typing import Any

from benchmarks.common import print_table, write_json
from moe_trainer.config.schema import MoEConfig
from moe_trainer.host_syncs import moe_layer_syncs
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.parallel.async_a2a import AsyncAllToAllTransport
from moe_trainer.parallel.comm import one_rank_group
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.overlap import ChunkedAllToAllTransport

EXPERT_CODE = ("moe_trainer/moe/experts.py", "moe_trainer/moe/expert_kernels.py")


def measure(tokens: int, experts: int) -> list[dict[str, Any]]:
    rows = []
    with one_rank_group("gloo") as group:
        for cf in (None, 1.0):
            cfg = MoEConfig(num_experts=experts, top_k=2, expert_hidden=16, capacity_factor=cf)
            paths: list[tuple[str, Any, int]] = [
                ("single (local)", None, 1),
                ("expert_parallel", Dispatcher(experts, cf, AllToAllTransport(group, 1, 0, experts)), 1),
                ("expert_parallel a2a_chunks=2",
                 Dispatcher(experts, cf, ChunkedAllToAllTransport(group, 1, 0, experts, 2)), 1),
                ("expert_parallel micro_batches=2",
                 Dispatcher(experts, cf, AsyncAllToAllTransport(group, 1, 0, experts)), 2),
            ]
            for name, dispatcher, micro in paths:
                fwd, bwd = moe_layer_syncs(cfg, dispatcher, tokens=tokens, micro_batches=micro)
                total = fwd.count() + bwd.count()
                rows.append({"path": name, "capacity_factor": cf, "forward": fwd.count(), "backward": bwd.count(),
                             "experts": total - fwd.count(EXPERT_CODE) - bwd.count(EXPERT_CODE),
                             "total": total, "where": {**fwd.by_place(), **{f"backward: {k}": v
                                                                           for k, v in bwd.by_place().items()}}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--name", default="host_syncs", help="JSON file name under benchmarks/results/")
    args = parser.parse_args()
    rows = measure(args.tokens, args.experts)
    print_table(rows, ["path", "capacity_factor", "forward", "backward", "experts", "total"])
    for r in rows:
        print(f"{r['path']} (capacity_factor={r['capacity_factor']}): {r['where']}")
    print(write_json(args.name, {"args": vars(args), "rows": rows}))


if __name__ == "__main__":
    main()
