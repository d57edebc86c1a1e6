"""Reusing running actors for another job: refused settings and dead actors leave no half-configured group."""

from __future__ import annotations

import time

import pytest
import ray

from actors.engine import RayEngine
from actors.group import ActorStartupError
from actors.worker import TrainWorker
from moe_trainer.config.schema import to_dataclass
from tests.conftest import compose_dict

LAYOUT = ["experiment=debug", "parallel=expert_parallel", "parallel.num_actors=2", "parallel.cpus_per_actor=0.5",
          "parallel.timeout_s=30"]


def wait_until_dead(actor: object, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while True:
        try:
            ray.get(actor.rendezvous_address.remote(), timeout=limit_s)  # type: ignore[attr-defined]
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, f"a killed actor still answers after {limit_s:.0f} s"
        time.sleep(0.05)


@pytest.mark.slow
def test_reuse_refuses_what_a_process_cannot_change_and_drops_dead_actors(ray_cluster: object) -> None:
    cfg = to_dataclass(compose_dict(LAYOUT))
    assert cfg.train.retain_freed_memory
    actors = [TrainWorker.options(num_cpus=0.5).remote(cfg, rank) for rank in range(2)]
    ray.get([actor.rendezvous_address.remote() for actor in actors], timeout=180)  # started (imports done)
    other = to_dataclass(compose_dict([*LAYOUT, "train.retain_freed_memory=false"]))
    with pytest.raises(ValueError, match=r"train.retain_freed_memory=False: .* started with True"):
        RayEngine(other, actors)
    # refused before anything changed: both still answer
    assert all(ray.get([actor.rendezvous_address.remote() for actor in actors], timeout=30))

    ray.kill(actors[1], no_restart=True)
    wait_until_dead(actors[1])  # the kill is asynchronous: a call made just after it may still be served
    with pytest.raises(ActorStartupError, match="did not take the new job"):
        RayEngine(cfg, actors)
    wait_until_dead(actors[0])  # the survivor may hold either config: ended too (killed, so eventually dead)
