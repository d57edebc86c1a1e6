"""Activation recompute (``train.recompute``) that never re-runs communication or a routing decision.

A recomputed region is a stretch of one rank's local math: its forward keeps only
the region's inputs, and backward runs it again to rebuild what its own backward
needs (``torch.utils.checkpoint``, non-reentrant). Regions end where a transfer
begins (an all-to-all, a message to expert actors), so the rows that crossing one
produced are kept as ordinary saved tensors and no transfer ever runs twice, whatever
the strategy: a remote expert actor gets exactly the messages it gets without
recompute (torchtitan's selective checkpointing keeps ``all_to_all_single``
outputs for the same reason).

A region that contains a router keeps the router's *decisions* (the ``topk`` or ``sort``
that picks experts or tokens) from the forward and recomputes only the arithmetic
around them (PyTorch's selective checkpointing, ``MUST_SAVE`` for those ops): the
dispatch plan was made from the forward's choice, and a recomputed choice that broke a
tie differently (repeated bytes give bit-identical router scores) would send gradient
to experts the rows never visited.

Modes (see docs/architecture.md, "Activation recompute"):

- ``attention``: the attention sub-block ``x + attn(attn_norm(x))`` of every block;
- ``block``: every block's local part before its first all-to-all (attention sub-block,
  FFN norm, router) as one region, dense FFN blocks whole, shared experts, and the
  routed experts' hidden activations (``SwiGLUExperts.recompute``: the expert function
  keeps its input rows and rebuilds the rest in backward).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

T = TypeVar("T")

# ops whose outputs are routing decisions: kept from the forward, never recomputed
_DECISIONS = (torch.ops.aten.topk.default, torch.ops.aten.sort.stable, torch.ops.aten.sort.default)


def _keep_decisions(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _DECISIONS else CheckpointPolicy.PREFER_RECOMPUTE


def recomputed(fn: Callable[..., T], *args: Any, keep_decisions: bool = False) -> T:
    """``fn(*args)`` whose saved activations are dropped after the forward and rebuilt in backward.

    ``keep_decisions``: the region routes tokens; its ``topk``/``sort`` outputs are saved, not
    recomputed. Without grad (evaluation) nothing is saved anyway, so ``fn`` just runs.
    """
    if not torch.is_grad_enabled():
        return fn(*args)
    context_fn = partial(create_selective_checkpoint_contexts, _keep_decisions) if keep_decisions else noop_context_fn
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)  # type: ignore[no-any-return]
