"""Wall-clock reads that are honest on GPU: CUDA work is asynchronous, so wait for it first.

On CPU this is ``time.perf_counter``. On GPU it synchronises the device, which costs the
overlap of the timed region with what follows: the price of numbers that mean something.
"""

from __future__ import annotations

import time

import torch


def now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
