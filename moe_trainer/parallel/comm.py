"""Process-group setup and the all-to-all autograd function, over ``deepspeed.comm``.

The all-to-all's backward is another all-to-all with send and receive split
sizes swapped, so gradients travel back along the path the tokens came.
Communication time is recorded as :class:`~moe_trainer.timing.Span` regions (CUDA
events on GPU), never by synchronising the device here.

Every module of ``parallel/`` reaches the collectives through ``dist`` below. Without
DeepSpeed installed (only the torch-only one-GPU check, ``benchmarks/gpu_check.py``)
it is :mod:`moe_trainer.parallel.torch_comm`, the same collectives of ``torch.distributed``.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed
from torch import Tensor

from moe_trainer.config.errors import CollectiveError
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import Span, mark

try:
    import deepspeed.comm as dist
except ImportError:  # the torch-only GPU check machine; the product requires DeepSpeed
    from moe_trainer.parallel import torch_comm as dist  # type: ignore[no-redef]

# DeepSpeed's CPU backend JIT-compiles a shared-memory op (``deepspeed_shm_comm``) when a process
# group starts. It serves only ``inference_all_reduce`` (DeepSpeed-Inference's tensor parallelism),
# which nothing here calls; building it cost 36-118 s per environment on 2 cores, and it was rebuilt
# whenever a process found another ``ninja`` first on PATH. Marking it incompatible skips the build;
# every collective we use goes to torch.distributed either way.
SKIPPED_DEEPSPEED_OPS = ("deepspeed_shm_comm",)


def _skip_unused_deepspeed_ops() -> None:
    """Marks the ops of :data:`SKIPPED_DEEPSPEED_OPS` incompatible before DeepSpeed's backend loads them.

    Only where the accelerator has the shared-memory op (DeepSpeed's CPU accelerator): elsewhere
    (CUDA) the backend never asks for it, and reading ``deepspeed.ops.__compatible_ops__`` would
    probe every op builder (compiler subprocesses, GPU queries) for nothing. On the CPU the probe
    runs once per process (0.1 s here) and its dict is kept, so the edit holds.
    """
    if dist.__name__ != "deepspeed.comm":
        return
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    for name in SKIPPED_DEEPSPEED_OPS:
        compatible[name] = False


def guarded(label: str, fn: Callable[[], Any]) -> Any:
    """Runs one collective; a failure (a peer died, ``parallel.timeout_s`` passed) says where it happened."""
    try:
        return fn()
    except RuntimeError as err:  # gloo/NCCL errors, DistBackendError is a RuntimeError
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else -1
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CollectiveError(f"rank {rank}: {label} failed: {first}") from err


def init_process_group(backend: str, master_addr: str, master_port: int, rank: int, world: int,
                       timeout_s: float) -> None:
    """Joins the DeepSpeed (torch.distributed) process group; rank 0's address is the rendezvous."""
    if torch.distributed.is_initialized():
        # deepspeed would silently keep the old group (and its old rank): refuse instead
        raise RuntimeError("this process already belongs to a process group; use one process per rank")
    _skip_unused_deepspeed_ops()
    dist.init_distributed(
        dist_backend=backend,
        auto_mpi_discovery=False,
        init_method=f"tcp://{master_addr}:{master_port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=timeout_s),
        verbose=False,
    )


@contextlib.contextmanager
def one_rank_group(backend: str, timeout_s: float = 60.0) -> Iterator[Any]:
    """This process alone as a whole process group (``gloo`` on CPU, ``nccl`` on one GPU), left at exit.

    Runs the distributed dispatch code, all-to-alls included, on one device: the
    one-GPU check (``benchmarks/gpu_check.py``) and the host-sync count use it.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_process_group(backend, "127.0.0.1", port, 0, 1, timeout_s)
    try:
        yield torch.distributed.group.WORLD
    finally:
        torch.distributed.destroy_process_group()


def new_group(ranks: list[int], timeout_s: float, backend: str | None = None) -> Any:
    """A subgroup with the same collective timeout as the world group (every rank must call this).

    ``backend``: another backend than the world's (``gloo`` for checkpoint coordination on GPUs).
    """
    return torch.distributed.new_group(ranks, timeout=timedelta(seconds=timeout_s), backend=backend)


def agreed_flag(local: Callable[[], bool], group: Any) -> Callable[[], bool]:
    """A check every rank of ``group`` calls at the same point; true on all of them when ``local`` is true on any.

    For a stop that must happen after the same step everywhere (a preemption reaches the ranks
    at different times). ``group`` is a gloo group, so the flag is a CPU int: no device sync.
    """
    flag = torch.zeros(1, dtype=torch.int32)

    def check() -> bool:
        flag.fill_(int(local()))
        guarded("all_reduce of the stop flag (preemption)",
                lambda: torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=group))
        return bool(flag[0])

    return check


def start_counts_exchange(counts_E: Tensor, group: Any, label: str = "") -> Callable[[], Tensor]:
    """Starts exchanging per-expert counts; the returned function waits and gives ``[P, E_local]``.

    Rank r sends ``counts[p*E_local:(p+1)*E_local]`` to rank p; row p of the result = how many
    rows peer p will send for each of my experts. Asynchronous so the caller can permute its
    rows while the (latency-bound) exchange travels.
    """
    out = torch.empty_like(counts_E)
    work = guarded(f"all_to_all of token counts ({label})",
                   lambda: dist.all_to_all_single(out, counts_E, group=group, async_op=True))

    def wait() -> Tensor:
        guarded(f"all_to_all of token counts ({label}, wait)", work.wait)
        return out.view(dist.get_world_size(group), -1)

    return wait


def all_to_all_counts(counts_E: Tensor, group: Any, label: str = "") -> Tensor:
    """:func:`start_counts_exchange`, waited for at once."""
    return start_counts_exchange(counts_E, group, label)()


@dataclass
class AsyncWire:
    """Asynchronous all-to-alls of one MoE block: issues them and counts rows, bytes and blocked time.

    Telemetry gets the time spent issuing plus the time spent waiting, i.e. the part of the
    transfer the rank could not hide behind other work.
    """

    group: Any
    me: int  # this rank in the group
    counters: CommCounters
    layer: int

    def start(self, out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], phase: str) -> Any:
        t0 = mark(inp.device)
        work = guarded(f"all_to_all {phase} of MoE block {self.layer}", lambda: dist.all_to_all_single(
            out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=self.group, async_op=True))
        self.counters.add_transfer(phase, in_splits, out_splits, self.me, inp.shape[-1] * inp.element_size(),
                                   Span.since(t0, inp.device))
        return work

    def wait(self, work: Any, phase: str, device: torch.device) -> None:
        t0 = mark(device)
        guarded(f"all_to_all {phase} of MoE block {self.layer} (wait)", work.wait)
        self.counters.add(phase, 0, 0, 0, Span.since(t0, device))


class AllToAll(torch.autograd.Function):
    """Differentiable ``all_to_all_single`` with uneven split sizes (rows of a 2-D tensor)."""

    @staticmethod
    def forward(ctx: Any, x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group: Any,
                timed: Callable[[Span], None] | None = None, label: str = "all_to_all") -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        ctx.timed, ctx.label = timed, label
        out = x_ND.new_empty(sum(recv_splits), x_ND.shape[-1])
        guarded(label, lambda: dist.all_to_all_single(out, x_ND.contiguous(), output_split_sizes=recv_splits,
                                                      input_split_sizes=send_splits, group=group))
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None, None, None]:
        t0 = mark(grad_out.device)
        grad_in = grad_out.new_empty(sum(ctx.send_splits), grad_out.shape[-1])
        guarded(f"{ctx.label} backward", lambda: dist.all_to_all_single(
            grad_in, grad_out.contiguous(), output_split_sizes=ctx.send_splits,
            input_split_sizes=ctx.recv_splits, group=ctx.group))
        if ctx.timed is not None:
            ctx.timed(Span.since(t0, grad_out.device))
        return grad_in, None, None, None, None, None


def all_to_all(x_ND: Tensor, send_splits: list[int], recv_splits: list[int], group: Any,
               timed: Callable[[Span], None] | None = None, label: str = "all_to_all") -> Tensor:
    """``AllToAll`` as a function; ``timed`` receives the region of the backward all-to-all."""
    out = AllToAll.apply(x_ND, send_splits, recv_splits, group, timed, label)
    assert isinstance(out, Tensor)
    return out
