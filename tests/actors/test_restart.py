"""What a Ray job restarts with after a loss, and a cluster too small for a job, on the session's real Ray.

The lost node here is an address no node of this cluster has: what the group reports after a
machine is gone (``tests/actors/test_multi_node.py`` loses a real one).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from actors.engine import RayEngine
from actors.group import NodeLost
from actors.restart import CannotContinue, restart_layout
from moe_trainer.config.errors import ConfigError
from moe_trainer.parallel.elastic import fits, layout, valid_layouts

LOST = NodeLost("node 10.255.0.9 was lost during train (ranks 4, 5, 6, 7)", {"f" * 56}, {"10.255.0.9"}, [4, 5, 6, 7])


def test_largest_valid_layouts_come_first(make_config: Any) -> None:
    ep = make_config("parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2")
    assert [layout(c) for c in valid_layouts(ep)] == [
        {"num_actors": 4, "ep_size": 2}, {"num_actors": 4, "ep_size": 1}, {"num_actors": 2, "ep_size": 2},
        {"num_actors": 2, "ep_size": 1}, {"num_actors": 1, "ep_size": 1}]
    disaggregated = make_config("parallel=disaggregated", "parallel.num_coordinators=2", "parallel.num_expert_actors=2")
    assert [layout(c) for c in valid_layouts(disaggregated)][:3] == [
        {"num_coordinators": 2, "num_expert_actors": 2}, {"num_coordinators": 1, "num_expert_actors": 2},
        {"num_coordinators": 2, "num_expert_actors": 1}]
    assert fits(ep, [{"CPU": 2.0}, {"CPU": 2.0}]) and not fits(ep, [{"CPU": 2.0}, {"CPU": 1.5}])
    assert not fits(make_config("parallel=data_parallel", "parallel.num_actors=2", "parallel.gpus_per_actor=1"),
                    [{"CPU": 8.0, "GPU": 1.0}])


def test_after_a_lost_node_the_job_continues_smaller_only_when_elastic(ray_cluster: object, make_config: Any,
                                                                       tmp_path: Path) -> None:
    # this cluster: 4 CPUs; the job had 8 actors of 1 CPU
    eight = ["parallel=expert_parallel", "parallel.num_actors=8", "parallel.ep_size=2"]
    checkpoint = tmp_path / "checkpoints" / "step_00000004"
    with pytest.raises(CannotContinue) as stopped:
        restart_layout(make_config(*eight), LOST, tmp_path, checkpoint)
    message = str(stopped.value)
    assert message.startswith("node 10.255.0.9 was lost during train (ranks 4, 5, 6, 7). The cluster now holds 1 node "
                              "with 4 CPUs; parallel.num_actors=8 parallel.ep_size=2 needs 8 actors with 8 CPUs")
    assert f"the last checkpoint, {checkpoint}, is intact" in message
    assert f"the same command with train.resume=auto hydra.run.dir={tmp_path}" in message
    assert "fault_tolerance.elastic=true (it would continue with parallel.num_actors=4 parallel.ep_size=2)" in message

    smaller = restart_layout(make_config(*eight, "fault_tolerance.elastic=true"), LOST, tmp_path, checkpoint)
    assert layout(smaller) == {"num_actors": 4, "ep_size": 2}
    fitting = make_config("parallel=expert_parallel", "parallel.num_actors=2")
    assert restart_layout(fitting, LOST, tmp_path, None) is fitting  # a lost actor, room left: the same layout
    # a run that shrank is restarted from its configured layout, which it gets back once the nodes hold it
    configured = make_config("parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2",
                             "fault_tolerance.elastic=true")
    assert restart_layout(configured, LOST, tmp_path, checkpoint) is configured


def test_a_cluster_too_small_is_waited_for_then_refused_naming_both(ray_cluster: object, make_config: Any) -> None:
    cfg = make_config("parallel=expert_parallel", "parallel.num_actors=8", "cluster.wait_for_resources_s=1")
    with pytest.raises(ConfigError) as refused:
        RayEngine(cfg)
    assert refused.value.setting == "parallel.num_actors"
    assert ("8 actors x 1 CPUs = 8 CPUs requested, the Ray cluster has 4 "
            "(after waiting 1 s, cluster.wait_for_resources_s)") in str(refused.value)
