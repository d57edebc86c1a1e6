"""The micro-batch schedule: several micro-batches through the blocks in lockstep.

Why here and not in the model: the order only matters when experts live elsewhere. At
each MoE block every micro-batch is routed and dispatched before any is finished, and a
micro-batch's expert results are landed only when it next needs its residual stream. So
while remote experts (disaggregated) work on micro-batch i, this process runs attention
for micro-batch i+1, and an asynchronous all-to-all (expert_parallel) travels while other
micro-batches compute; the last micro-batch's results overlap the next block's attention
for the first ones. With local experts the result equals running the micro-batches one
by one through :meth:`~moe_trainer.model.transformer.Transformer.forward`: the same blocks,
the same math; only the order of independent work changes.

Every rank builds the same schedule, so transfers are posted in the same order everywhere
(collectives and point-to-point messages need that).
"""

from __future__ import annotations

from torch import Tensor

from moe_trainer.model.transformer import ModelOutput, Transformer
from moe_trainer.moe.layer import MoELayer, MoEStats, PendingMoE


def run_microbatches(model: Transformer, idx_list: list[Tensor], num_groups: int = 1) -> list[ModelOutput]:
    """``model``'s output for each micro-batch of ``idx_list``, run in lockstep (see the module docstring)."""
    if len(idx_list) == 1:
        return [model(idx_list[0], num_groups)]
    xs = [model.embed(idx) for idx in idx_list]
    keys = [model.routing_keys(idx) for idx in idx_list]  # moe.selection_noise's, from each row's own tokens
    stats: list[list[MoEStats]] = [[] for _ in idx_list]
    in_flight: list[tuple[MoELayer, PendingMoE] | None] = [None] * len(xs)  # results not yet landed

    def land(i: int) -> None:
        pending = in_flight[i]
        if pending is not None:
            layer, p = pending
            y, layer_stats = layer.complete(p)
            xs[i] = xs[i] + y
            stats[i].append(layer_stats)
            in_flight[i] = None

    for block in model.blocks:
        if isinstance(block.ffn, MoELayer):
            started = []
            for i in range(len(xs)):
                land(i)
                xs[i], h_BSD, routing = block.before_dispatch(xs[i], num_groups, keys[i])
                started.append(block.ffn.start(h_BSD, num_groups, routing))
            # every micro-batch's experts before any combine: micro-batch i's results travel back
            # while micro-batch i+1's experts compute
            for i, p in enumerate(started):
                in_flight[i] = (block.ffn, block.ffn.compute(p))
        else:
            for i in range(len(xs)):
                land(i)
                xs[i] = block(xs[i], num_groups)[0]
    for i in range(len(xs)):
        land(i)
    return [model.output(x, s) for x, s in zip(xs, stats, strict=True)]
