"""Runs a function in N fresh processes (spawn), one rank each, and returns every rank's result.

Used by the 2-process benchmarks: every rank joins the DeepSpeed gloo group through
``moe_trainer.parallel.comm.init_process_group`` itself; this module only gives it a
rank, the world size and a free rendezvous port, and brings the return values back.
"""

from __future__ import annotations

import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def timed_after_barrier(fn: Callable[[], Any], group: Any) -> float:
    """Seconds ``fn`` takes on this rank, started together with the other ranks (barrier first)."""
    import torch.distributed as tdist

    tdist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(fn: Callable[..., Any], rank: int, world: int, port: int, args: tuple[Any, ...], out: Any) -> None:
    try:
        out.put((rank, fn(rank, world, port, *args), None))
    except BaseException:  # noqa: BLE001 - reported to the parent with the traceback
        out.put((rank, None, traceback.format_exc()))


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 3600.0) -> list[Any]:
    """``fn(rank, world, port, *args)`` in ``world`` spawned processes; results in rank order.

    ``fn`` must be importable (a module-level function). A rank that raises ends the
    run: the others are terminated and the traceback is re-raised here.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, world, port, args, out), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(results) < world:
            try:
                rank, result, err = out.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode is not None]
                if dead:  # died without a word (killed, crashed in bootstrap): the others would wait forever
                    raise RuntimeError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} "
                                       "before returning a result") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} gave no result "
                                       f"in {timeout_s:.0f} s") from None
                continue
            if err is not None:
                raise RuntimeError(f"rank {rank} failed:\n{err}")
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=30 if len(results) == world else 1)
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
    return [results[r] for r in range(world)]
