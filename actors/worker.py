"""The Ray actor of every Ray strategy: a thin shell around what one rank runs.

A rank runs a Trainer (data/expert parallel, and disaggregated coordinators) or an
ExpertServer (disaggregated expert actors); see ``moe_trainer.parallel.setup``.
Whole chunks of steps run per call, so Ray's per-call cost is paid once per chunk,
not per step or per layer.
"""

from __future__ import annotations

import math
import os
import random
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
import torch.distributed

from moe_trainer.config.schema import Config
from moe_trainer.host_memory import retain_freed_memory
from moe_trainer.parallel.resources import rank_resources, rank_role, torch_threads
from moe_trainer.train.nan_guard import SkipPolicy, nonfinite_tensors, run_steps


@ray.remote(concurrency_groups={"control": 1})
class TrainWorker:
    """Training calls run one at a time (the default group); ``request_stop`` runs in a thread of its own
    (the ``control`` group), so it reaches a rank in the middle of a chunk."""

    def __init__(self, cfg: Config, rank: int) -> None:
        # a process setting, applied once: glibc's thresholds cannot be taken back, so reuse checks it
        self.retains_freed_memory = cfg.train.retain_freed_memory
        if self.retains_freed_memory:
            retain_freed_memory()
        self._configure(cfg, rank)

    def _configure(self, cfg: Config, rank: int) -> None:
        self.cfg, self.rank = cfg, rank
        self.setup: Any = None
        self.pending_save: Callable[[], None] | None = None  # waits for this rank's background checkpoint writes
        self.skips = SkipPolicy.from_config(cfg.train)
        self.stop_requested = threading.Event()
        self.stop: Callable[[], bool] | None = None  # the ranks' agreement on stopping (set by join)

    @ray.method(concurrency_group="control")
    def ping(self) -> bool:
        """Answers at once, even in the middle of a chunk: the process is alive (see ``ActorGroup``)."""
        return True

    @ray.method(concurrency_group="control")
    def request_stop(self) -> None:
        """Preemption: the chunk in flight ends after the step every rank is at when one of them sees this."""
        self.stop_requested.set()

    def reuse(self, cfg: Config, rank: int) -> None:
        """Leaves the old process group and takes another job's config and rank (see ``ActorGroup``'s ``actors``).

        What a rank builds (model, optimizer, data, dispatchers, process groups) is rebuilt by the
        next ``join``; what stays is the process itself: its imports and its allocator setting,
        so a job that wants the other ``train.retain_freed_memory`` is refused (it needs new actors),
        and so is one whose rank ``rank`` reserves other CPUs or GPUs than Ray gave this actor
        (a disaggregated role sized apart, another ``parallel.cpus_per_actor``): a running
        actor's reservation cannot change, and a rank must compute with what it reserved.
        """
        if cfg.train.retain_freed_memory != self.retains_freed_memory:
            raise ValueError(f"train.retain_freed_memory={cfg.train.retain_freed_memory}: this actor's process "
                             f"was started with {self.retains_freed_memory}, which it cannot change; "
                             "start new actors for this job")
        self._check_reservation(cfg, rank)
        self.leave()
        self._configure(cfg, rank)

    def _check_reservation(self, cfg: Config, rank: int) -> None:
        """Refuses rank ``rank`` of ``cfg`` unless its ``(cpus, gpus)`` is what Ray reserved for this actor."""
        assigned = ray.get_runtime_context().get_assigned_resources()
        have = (assigned.get("CPU", 0.0), assigned.get("GPU", 0.0))
        want = rank_resources(cfg, rank)
        if not all(math.isclose(h, w, abs_tol=1e-4) for h, w in zip(have, want, strict=True)):  # Ray's unit: 1e-4
            role = rank_role(cfg, rank)
            raise ValueError(f"rank {rank} ({role.role}) reserves {want[0]:g} CPU and {want[1]:g} GPU "
                             f"({role.cpus_setting}, {role.gpus_setting}), but this actor was placed with "
                             f"{have[0]:g} CPU and {have[1]:g} GPU, which a running actor cannot change; "
                             "start new actors for this job")

    def leave(self) -> None:
        """Drops this rank's model and state and destroys its torch.distributed process groups.

        ``deepspeed.comm`` keeps its backend object, but its next ``init_distributed`` starts a new
        group because it asks torch whether one exists; the dispatchers' subgroups are rebuilt by ``join``.
        """
        self.setup = None
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's address and a free port; rank 0's becomes everyone's rendezvous.

        The port is drawn below Linux's ephemeral range (32768+), which outgoing connections
        take from, and above Ray's worker ports, so it is unlikely to be taken before bind.
        """
        host = ray.util.get_node_ip_address()
        rng = random.Random()
        for _ in range(100):
            port = rng.randrange(20000, 32768)
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return host, port
        raise RuntimeError(f"no free rendezvous port on {host} in 20000-32767")

    def join(self, master_addr: str, master_port: int) -> dict[str, Any]:
        from moe_trainer.parallel.comm import agreed_flag
        from moe_trainer.parallel.setup import build_rank, local_parameter_counts

        # here, not at construction: a pool of actors may be started with a placeholder config whose
        # world does not hold their rank (tests/actors/equivalence.py); a joining rank's is real
        torch.set_num_threads(torch_threads(rank_resources(self.cfg, self.rank)[0]))
        self.setup = build_rank(self.cfg, self.rank, master_addr, master_port)
        self.stop_requested.clear()  # a request to an earlier job of a reused actor is not this job's
        self.stop = agreed_flag(self.stop_requested.is_set, self.setup.control_group)
        if self.setup.role != "experts":  # the trainer's timeline names this rank by its place in the whole job
            self.setup.runner.ctx.global_rank, self.setup.runner.ctx.role = self.rank, self.setup.role
        return {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
                "node_id": ray.get_runtime_context().get_node_id(),
                "role": self.setup.role, "backend": self.setup.backend, "expert_range": list(self.setup.expert_range),
                **local_parameter_counts(self.setup.runner.model)}

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        runner = self.setup.runner
        if self.setup.role == "experts":
            return run_steps(runner.train_step, num_steps, self.skips, self.stop)
        return run_steps(lambda: runner.train_step().record, num_steps, self.skips, self.stop)

    def evaluate(self) -> float | None:
        if self.setup.role == "experts":
            self.setup.runner.evaluate(self.cfg.train.eval_batches)
            return None
        return self.setup.runner.evaluate()

    def gradients(self) -> dict[str, torch.Tensor]:
        """This rank's gradients under checkpoint keys (see ``Engine.gradients``)."""
        from moe_trainer.train.sharded_checkpoint import canonical_grads

        return canonical_grads(self.setup.runner)

    def nonfinite_state(self) -> list[str]:
        return nonfinite_tensors(self.setup.runner.model, self.setup.runner.optimizer)

    def save(self, directory: str, background: bool = False) -> None:
        """Writes this rank's entries (a collective of every rank); ``background``: returns once they are copied."""
        from moe_trainer.train.sharded_checkpoint import save_shard

        s = self.setup
        self.pending_save = save_shard(Path(directory), s.runner, s.checkpoint_group, dense=s.save_dense,
                                       experts=s.save_experts, background=background,
                                       optim_owner=s.optim_owner)

    def finish_save(self) -> None:
        """Waits until this rank's background writes are done (re-raising their error)."""
        wait, self.pending_save = self.pending_save, None
        if wait is not None:
            wait()

    def load(self, path: str) -> None:
        from moe_trainer.train.sharded_checkpoint import load_into

        load_into(Path(path), self.setup.runner)
