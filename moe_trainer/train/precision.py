"""``train.precision``: the dtype matmuls and all-to-all payloads use; master weights stay fp32.

bf16 is mixed precision in the usual sense (Micikevicius et al., https://arxiv.org/abs/1710.03740,
without loss scaling, which bf16's fp32-sized exponent makes unnecessary): parameters, their
gradients and AdamW's moments are fp32; the forward runs under ``torch.autocast``, which casts
matmul inputs (linear layers, attention) to bf16; the router, every loss, the norms and the
residual stream stay fp32. The MoE layer casts the rows it dispatches to the autocast dtype
(:func:`moe_trainer.moe.expert_kernels.compute_dtype`) so every all-to-all moves half the bytes, and the
experts compute in the dtype of the rows they receive. fp32 enters no autocast region at all,
so it runs exactly the ops it ran before precision existed.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager

import torch

COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision: str) -> torch.dtype:
    """The dtype of matmuls and all-to-all payloads under ``train.precision``."""
    return COMPUTE_DTYPES[precision]


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The context a forward pass (training and evaluation) runs in; nothing at all for fp32.

    Autocast's weight-cast cache is off: with it, a weight is cast by the first micro-batch
    that uses it and not by the next ones, so a recompute region (``train.recompute``, which
    runs without the cache in backward) would see other ops than its forward did and fail.
    Without it every micro-batch casts its weights (a weight-sized copy per matmul).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision), cache_enabled=False)
