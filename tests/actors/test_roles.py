"""Disaggregated roles sized apart: each actor gets its own role's CPUs, threads and checks, end to end."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import ray
import torch

from actors.engine import RayEngine, _starting
from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config
from moe_trainer.config.validate import validate
from moe_trainer.parallel.resources import rank_resources, role_resources

# 1 coordinator with 2 CPUs + 1 expert actor with half a CPU: 2.5 of the test cluster's 4, and
# torch threads that differ by role (2 and 1), so a rank sized by the wrong role shows.
LAYOUT = ["parallel=disaggregated", "parallel.num_expert_actors=1", "parallel.timeout_s=60"]
ROLES = [*LAYOUT, "parallel.cpus_per_coordinator=2", "parallel.cpus_per_expert_actor=0.5"]


def reservation(worker: Any) -> dict[str, Any]:
    """Runs inside a TrainWorker (``__ray_call__``): what Ray reserved for it and what it computes with."""
    return {"role": worker.setup.role, "backend": worker.setup.backend, "threads": torch.get_num_threads(),
            "assigned": ray.get_runtime_context().get_assigned_resources()}


def test_each_rank_takes_its_roles_resources_and_the_rest_falls_back(make_config: Callable[..., Config]) -> None:
    sized = make_config(*ROLES, "parallel.num_coordinators=2", "train.batch_size=8")
    assert [rank_resources(sized, rank) for rank in range(3)] == [(2.0, 0.0), (2.0, 0.0), (0.5, 0.0)]
    coordinators, experts = role_resources(sized)
    assert (coordinators.cpus_setting, experts.cpus_setting) == ("parallel.cpus_per_coordinator",
                                                                 "parallel.cpus_per_expert_actor")
    assert experts.gpus_setting == "parallel.gpus_per_actor"  # unset: every role falls back, value by value
    preset = make_config("parallel=disaggregated")
    assert [rank_resources(preset, rank) for rank in range(3)] == [(0.5, 0.0)] * 3
    assert [r.cpus_setting for r in role_resources(preset)] == ["parallel.cpus_per_actor"] * 2
    assert _starting(sized, reused=False).startswith(
        "starting 3 actors (disaggregated: 2 coordinators with 2 CPU each, 1 expert actor with 0.5 CPU): ")
    assert _starting(make_config("parallel=expert_parallel"), reused=False).startswith(
        "starting 2 actors (expert_parallel, 1 CPU each): ")


def test_more_cpus_than_the_cluster_has_names_the_role_setting(ray_cluster: object,
                                                               make_config: Callable[..., Config]) -> None:
    cfg = make_config("parallel=disaggregated", "parallel.cpus_per_expert_actor=2")  # 0.5 + 2 x 2 = 4.5 of 4
    validate(cfg)
    with pytest.raises(ConfigError) as err:
        RayEngine(cfg)
    assert err.value.setting == "parallel.cpus_per_expert_actor" and err.value.value == 2
    assert ("1 coordinator x 0.5 CPUs (parallel.cpus_per_actor) + 2 expert actors x 2 CPUs "
            "(parallel.cpus_per_expert_actor) = 4.5 CPUs requested, the Ray cluster has 4") in str(err.value)
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")  # no actor was started


@pytest.mark.slow
def test_roles_sized_apart_train_with_what_each_reserved(ray_cluster: object,
                                                         make_config: Callable[..., Config]) -> None:
    cfg = make_config(*ROLES)
    validate(cfg)
    engine = RayEngine(cfg)
    try:
        assert [r["step"] for r in engine.train(1)] == [1]
        coordinator, expert_actor = engine.group.call("__ray_call__", reservation)
        assert coordinator == {"role": "coordinator", "backend": "gloo", "threads": 2, "assigned": {"CPU": 2.0}}
        assert expert_actor == {"role": "experts", "backend": "gloo", "threads": 1, "assigned": {"CPU": 0.5}}

        # A running actor's reservation cannot change: the roles' sizes swapped are refused before any
        # actor leaves its job (whereupon both do, as any refused reuse does) ...
        swapped = make_config(*LAYOUT, "parallel.cpus_per_coordinator=0.5", "parallel.cpus_per_expert_actor=2")
        refused = (r"rank 0 \(coordinator\) reserves 0.5 CPU .* placed with 2 CPU"  # whichever rank answers first
                   r"|rank 1 \(expert actor\) reserves 2 CPU .* placed with 0.5 CPU")
        with pytest.raises(ValueError, match=refused):
            RayEngine(swapped, engine.group.actors)
        # ... and the same sizes are taken: the actors' placement-group reservations match their ranks
        again = RayEngine(cfg, engine.group.actors)
        try:
            assert [r["step"] for r in again.train(1)] == [1]
        finally:
            again.close()
    finally:
        engine.close()
