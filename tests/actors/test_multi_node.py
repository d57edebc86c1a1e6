"""Ray strategies on a real cluster of two nodes (``two_nodes``: 127.0.0.3 and 127.0.0.2, 2 CPUs each).

``moe-train`` runs as a user runs it against a cluster (``cluster.address=`` the head's GCS),
in its own process; the references run in this process on the session's local Ray. Losing a
node is ``SIGKILL`` to every process of the second node at once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TwoNodeCluster
from tests.helpers import read_records, train_run
from tests.ray_nodes import wait_for_nodes

MOE_TRAIN = str(Path(sys.executable).parent / "moe-train")
COMMON = ["train.log_every=1", "train.keep_last=0", "logger.mode=disabled", "logger.progress=false"]
# 4 actors of 1 CPU over 2 nodes of 2 CPUs, two expert-parallel groups of 2
STEPS = 24
EP4 = ["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2", "parallel.placement=spread",
       f"train.max_steps={STEPS}", "train.checkpoint_every=4", f"train.eval_every={STEPS}", *COMMON]


def _start(cluster: TwoNodeCluster, run_dir: Path, *overrides: str) -> subprocess.Popen[str]:
    log = run_dir.parent / f"{run_dir.name}.log"
    return subprocess.Popen([MOE_TRAIN, "experiment=debug", *overrides, f"cluster.address={cluster.head.gcs}",
                             f"hydra.run.dir={run_dir}"], stdout=log.open("w"), stderr=subprocess.STDOUT, text=True,
                            env=cluster.driver_env(), cwd=run_dir.parent)


def _finish(proc: subprocess.Popen[str], run_dir: Path, timeout_s: float = 300) -> str:
    proc.wait(timeout=timeout_s)
    out = (run_dir.parent / f"{run_dir.name}.log").read_text()
    assert proc.returncode == 0, out[-4000:]
    return out


def _steps_done(run_dir: Path) -> int:
    """The last training step ``metrics.jsonl`` holds (complete lines only: the run appends while this reads)."""
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().split("\n")[:-1] if metrics.exists() else []
    return max((json.loads(line)["step"] for line in lines if '"loss"' in line), default=0)


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_lost_node_is_survived_on_the_head_alone_with_the_smaller_layouts_losses(
        two_nodes: TwoNodeCluster, ray_cluster: object, tmp_path: Path) -> None:
    two_nodes.ensure_worker()
    run_dir = tmp_path / "run"
    proc = _start(two_nodes, run_dir, *EP4, "fault_tolerance.elastic=true")
    deadline = time.monotonic() + 240
    while _steps_done(run_dir) < 6 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    # placed by node: each expert-parallel group (ranks 0-1, 2-3: the all-to-alls) inside one node
    layout = json.loads((run_dir / "processes.json").read_text())["layout"]
    nodes = [row["node"] for row in layout]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and set(nodes) == {"127.0.0.3", "127.0.0.2"}
    killed_at = time.time()
    two_nodes.worker.kill()
    out = _finish(proc, run_dir)

    records = read_records(run_dir)
    (restart,) = [r for r in records if "restart" in r]
    assert restart["lost_nodes"] == ["127.0.0.2"] and restart["reason"].startswith("node 127.0.0.2 was lost")
    assert restart["old_layout"] == {"num_actors": 4, "ep_size": 2}
    assert restart["new_layout"] == {"num_actors": 2, "ep_size": 2}
    assert 0 <= restart["steps_lost"] < 4 and restart["step"] % 4 == 0
    noticed_s = restart["noticed_at"] - killed_at
    assert noticed_s < 10, f"the loss was noticed {noticed_s:.1f} s after the kill"
    assert "moe-train: layout: 127.0.0.3:" in out and "restart 1/2 after step" in out
    final = json.loads((run_dir / "processes.json").read_text())
    assert final["nodes"] == ["127.0.0.3", "127.0.0.3"]  # finished on the head node alone
    print(f"\nnode loss: noticed {noticed_s:.2f} s after SIGKILL, restart {restart['restart_time_s']:.1f} s, "
          f"steps lost {restart['steps_lost']} (failed at {restart['failed_at_step']}, resumed at {restart['step']})")

    # before the loss: the 4 actors on 2 nodes compute what single computes
    run = _losses(records)
    single = train_run(tmp_path / "single", *[o for o in EP4 if not o.startswith("parallel")]).losses
    for step in range(1, restart["failed_at_step"] + 1):
        before = [r["loss"] for r in records if r.get("step") == step and "loss" in r][0]
        assert before == pytest.approx(single[step], rel=1e-5), step
    # after it: exactly the steps of a run started from that checkpoint with the smaller layout
    smaller = [o for o in EP4 if not o.startswith(("parallel.num_actors", "parallel.placement"))]
    resumed = train_run(tmp_path / "ref", *smaller, "parallel.num_actors=2", f"train.resume={restart['resumed_from']}")
    assert sorted(resumed.losses) == list(range(restart["step"] + 1, STEPS + 1))
    assert {step: run[step] for step in resumed.losses} == resumed.losses


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_job_waits_for_a_node_then_runs_disaggregated_across_both(two_nodes: TwoNodeCluster,
                                                                     tmp_path: Path) -> None:
    two_nodes.worker.stop()  # the cluster is short of 2 CPUs until the node comes (back)
    wait_for_nodes(two_nodes.head, {two_nodes.head.ip})
    run_dir, steps = tmp_path / "run", 6
    job = ["parallel=disaggregated", "parallel.num_coordinators=2", "parallel.num_expert_actors=2",
           "parallel.cpus_per_actor=1", "parallel.placement=spread", f"train.max_steps={steps}",
           "train.checkpoint_every=0", f"train.eval_every={steps}", *COMMON]
    proc = _start(two_nodes, run_dir, *job, "cluster.wait_for_resources_s=180")
    log = tmp_path / "run.log"
    deadline = time.monotonic() + 120
    while "waiting up to 180 s" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None, log.read_text()[-3000:]
    two_nodes.ensure_worker()
    out = _finish(proc, run_dir)
    waited = [line for line in out.splitlines() if "waiting up to 180 s (cluster.wait_for_resources_s)" in line]
    assert len(waited) == 1 and waited[0].endswith("= 4 CPUs requested, the Ray cluster has 2"), waited
    processes = json.loads((run_dir / "processes.json").read_text())
    assert set(processes["nodes"]) == {"127.0.0.3", "127.0.0.2"}
    single = train_run(tmp_path / "single", *[o for o in job if not o.startswith("parallel")]).losses
    got = _losses(read_records(run_dir))
    assert sorted(got) == list(range(1, steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(single[step], rel=1e-5), step
