"""``torch.distributed`` under the part of ``deepspeed.comm``'s interface this package calls.

Used only where DeepSpeed is not installed: the borrowed one-GPU machine that runs
``benchmarks/gpu_check.py`` has torch and nothing else. The product itself requires
DeepSpeed (``pyproject.toml``) and always goes through ``deepspeed.comm``; both end in
the same ``torch.distributed`` collectives, so the math is the same either way.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed
from torch.distributed import ReduceOp, all_reduce, all_to_all_single, broadcast, get_world_size, irecv, isend

__all__ = ["ReduceOp", "all_reduce", "all_to_all_single", "broadcast", "get_world_size", "init_distributed", "irecv",
           "isend"]


def init_distributed(dist_backend: str, auto_mpi_discovery: bool, init_method: str, rank: int, world_size: int,
                     timeout: timedelta, verbose: bool) -> None:
    """``deepspeed.comm.init_distributed``'s signature; MPI discovery and verbosity do not apply."""
    del auto_mpi_discovery, verbose
    torch.distributed.init_process_group(dist_backend, init_method=init_method, rank=rank, world_size=world_size,
                                         timeout=timeout)
