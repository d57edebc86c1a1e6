"""The Engine of the Ray strategies: the driver's view of an actor group."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import ray

from actors.cluster import Request, check_resources, connect, disconnect, is_embedded
from actors.group import ActorGroup
from moe_trainer.config.schema import Config
from moe_trainer.data import build_tokenizer
from moe_trainer.engine import (
    begin_engine_checkpoint,
    checkpoint_signature,
    model_parameter_counts,
    save_engine_checkpoint,
)
from moe_trainer.parallel.placement import describe, layout_rows
from moe_trainer.parallel.resources import role_resources
from moe_trainer.startup import phase
from moe_trainer.train.aggregate import add_expert_role, aggregate_chunk
from moe_trainer.train.checkpoint import BackgroundSave, check_checkpoint


def request_for(cfg: Config) -> Request:
    return Request(role_resources(cfg))


def _size(cpus: float, gpus: float) -> str:
    return f"{cpus:g} CPU" + (f", {gpus:g} GPU" if gpus else "")


def _starting(cfg: Config, reused: bool) -> str:
    """The start-up line of an actor group: how many processes of what size, for which strategy.

    Disaggregated roles are listed each with its size, since they are sized apart
    (``1 coordinator with 1 CPU, 2 expert actors with 0.5 CPU each``).
    """
    request = request_for(cfg)
    if reused:
        return f"reusing {request.actors} actors ({cfg.parallel.strategy})"
    if len(request.roles) == 1:
        role = request.roles[0]
        what = f"{cfg.parallel.strategy}, {_size(role.cpus, role.gpus)} each"
    else:
        what = f"{cfg.parallel.strategy}: " + ", ".join(
            f"{role.count()} with {_size(role.cpus, role.gpus)}{' each' if role.actors > 1 else ''}"
            for role in request.roles)
    return (f"starting {request.actors} actors ({what}): "
            "each imports torch and DeepSpeed, loads the data and builds its part of the model")


class RayEngine:
    """Every Ray strategy: one TrainWorker per rank (disaggregated: coordinators first, then expert actors)."""

    def __init__(self, cfg: Config, actors: list[Any] | None = None) -> None:
        """``actors``: running TrainWorkers to reuse, one per rank (see :class:`ActorGroup`)."""
        self.cfg = cfg
        self.cluster = connect(cfg.cluster)
        try:
            if actors is None:  # the embedded Ray never grows: never waited for
                check_resources(request_for(cfg), 0.0 if is_embedded() else cfg.cluster.wait_for_resources_s)
            self.tokenizer = build_tokenizer(cfg.data.tokenizer)  # the resolved file the actors load too
            t0 = time.perf_counter()
            phase(_starting(cfg, reused=actors is not None))
            self.group = ActorGroup(cfg, request_for(cfg), actors=actors)
            phase(f"{len(self.group.actors)} actors joined their process group ({time.perf_counter() - t0:.1f} s)")
            for line in describe(layout_rows(self.group.infos)):
                phase(f"layout: {line}")
        except BaseException:
            disconnect()
            raise
        self._step = 0
        self.background: BackgroundSave | None = None

    @property
    def step(self) -> int:
        return self._step

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        per_rank = self.group.call("train", num_steps)
        trainers = [r for r, info in zip(per_rank, self.group.infos, strict=True) if info["role"] != "experts"]
        records = aggregate_chunk(trainers)
        experts = [r for r, info in zip(per_rank, self.group.infos, strict=True) if info["role"] == "experts"]
        if experts:
            add_expert_role(records, experts)
        self._step = records[-1]["step"]
        return records

    def evaluate(self) -> float:
        return self.group.call("evaluate")[0]

    def request_stop(self) -> None:
        """Preemption: every rank is told (in its control thread); they agree on the step to stop after."""
        for actor in self.group.actors:
            actor.request_stop.remote()

    def nonfinite_state(self) -> list[str]:
        return [f"rank {rank}: {name}" for rank, names in enumerate(self.group.call("nonfinite_state"))
                for name in names]

    def save(self, root: Path) -> Path:
        return save_engine_checkpoint(root, self._step, lambda d: self.group.call("save", str(d)), self.cfg,
                                      self.tokenizer)

    def save_in_background(self, root: Path) -> None:
        pending = begin_engine_checkpoint(root, self._step, self.cfg, self.tokenizer)
        self.group.call("save", str(pending.tmp), True)  # returns once every rank has copied its entries
        self.background = BackgroundSave(pending, lambda: self.group.call("finish_save"))

    def finish_save(self) -> Path | None:
        background, self.background = self.background, None
        return None if background is None else background.finish()

    def load(self, path: Path) -> None:
        check_checkpoint(path, checkpoint_signature(self.cfg, self.tokenizer))
        self.group.call("load", str(path))
        self._step = int(path.name.removeprefix("step_"))

    def info(self) -> dict[str, Any]:
        infos = self.group.infos
        first = infos[0]
        return {
            "processes": len(infos),
            "roles": [i["role"] for i in infos],
            "pids": [i["pid"] for i in infos],
            "nodes": [i["node"] for i in infos],
            "backend": first["backend"],
            "cluster": self.cluster,
            "ray_gcs_address": ray.get_runtime_context().gcs_address,
            "actor_join_time_s": self.group.join_time_s,
            "params_per_actor": [i["params_local"] for i in infos],
            "expert_params_per_actor": [i["expert_params_local"] for i in infos],
            "expert_range_per_actor": [i["expert_range"] for i in infos],
            "layout": layout_rows(infos),
            **model_parameter_counts(self.cfg, self.tokenizer.vocab_size),
        }

    def gradients(self) -> list[dict[str, Any]]:
        return self.group.call("gradients")

    def close(self, keep_cluster: bool = False) -> None:
        """Stops the actors; ``keep_cluster`` keeps the Ray connection for a rebuilt group (restarts).

        A background save still in flight is deleted, never completed: its writers are gone.
        """
        self.group.shutdown()
        if self.background is not None:
            self.background.pending.abandon()
            self.background = None
        if not keep_cluster:
            disconnect()
