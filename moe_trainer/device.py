"""Where a process computes: the device of ``single``, the process-wide GPU math settings, batch copies.

Ray strategies take their device from each rank's GPUs (``parallel.gpus_per_actor``, or a
disaggregated role's own setting; one GPU per rank, NCCL; see
:mod:`moe_trainer.parallel.resources`); ``single`` from ``train.device``. Both
call :func:`configure_process` once, when the process sets up, so GPU math settings
live in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor


def single_device(setting: str) -> torch.device:
    """``train.device`` for ``single``: ``auto`` is the current CUDA device when one is visible, else the CPU.

    ``cuda`` without a visible GPU is refused by validation before this runs.
    """
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def configure_process(device: torch.device) -> None:
    """Process-wide math settings for ``device``: on a GPU, fp32 matmuls and convolutions may use TF32.

    TF32 keeps fp32's range with a 10-bit mantissa on the tensor cores (Ampere and
    later), about 7x the plain fp32 matmul rate of an H100/H200; the product's fp32 on a GPU
    means "fp32 storage, TF32 matmuls", as in Megatron-Core and torchtitan. CPU math is
    left exactly as it is. torch 2.9+ has per-backend precision settings, and refuses a
    mix of those with the older flags, so the newer ones are used where they exist.
    """
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]
    else:  # torch < 2.9
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Copies a host batch to ``device``; to a GPU from pinned memory without blocking the host.

    A pageable host tensor is copied synchronously (the driver stages it through a
    pinned buffer while the host waits); from pinned memory the copy is queued on the
    stream and the host goes on launching the step. On the CPU this is ``t.to(device)``.
    """
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
