"""Ray strategies on a real cluster of two nodes (``two_nodes``: 127.0.0.3 and 127.0.0.2, 2 CPUs each).

``moe-train`` runs as a user runs it against a cluster (``cluster.address=`` the head's GCS),
in its own process; the references run in this process on the session's local Ray. Losing a
node is ``SIGKILL`` to every process of the second node at once (its raylet, its agents and
the actors' workers, which Ray puts in process groups of their own: ``tests/ray_nodes.py``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from moe_trainer.train.sharded_checkpoint import read_entries
from tests.conftest import TwoNodeCluster
from tests.helpers import assert_rel_close, read_records, train_run
from tests.ray_nodes import wait_for_nodes

MOE_TRAIN = str(Path(sys.executable).parent / "moe-train")
COMMON = ["train.log_every=1", "train.keep_last=0", "logger.mode=disabled", "logger.progress=false"]
# 4 actors of 1 CPU over 2 nodes of 2 CPUs, two expert-parallel groups of 2
STEPS = 32
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


def _losses(records: list[dict[str, Any]]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _wait_for(run_dir: Path, proc: subprocess.Popen[str], restarts: int, steps: int) -> None:
    """Until the run has recorded ``restarts`` restarts and then trained ``steps`` steps."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        records = _complete_records(run_dir)
        starts = [i for i, r in enumerate(records) if "restart" in r]
        if len(starts) >= restarts:
            since = records[starts[restarts - 1] + 1:] if restarts else records
            if sum("loss" in r for r in since) >= steps:
                return
        time.sleep(0.1)
    raise AssertionError(f"the run never trained {steps} steps after {restarts} restarts (exit {proc.poll()})")


def _complete_records(run_dir: Path) -> list[dict[str, Any]]:
    """``metrics.jsonl``'s complete lines (the run appends while this reads)."""
    metrics = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().split("\n")[:-1]] if metrics.exists() else []


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_killed_actor_then_a_lost_node_are_survived_the_second_on_the_head_alone_with_the_smaller_layout(
        two_nodes: TwoNodeCluster, ray_cluster: object, tmp_path: Path) -> None:
    two_nodes.ensure_worker()
    run_dir = tmp_path / "run"
    proc = _start(two_nodes, run_dir, *EP4, "fault_tolerance.elastic=true")
    # the uninterrupted single reference trains here meanwhile, while the run starts its actors
    pool = ThreadPoolExecutor(max_workers=1)
    reference = pool.submit(train_run, tmp_path / "single", *[o for o in EP4 if not o.startswith("parallel")])
    _wait_for(run_dir, proc, restarts=0, steps=6)
    # placed by node: each expert-parallel group (ranks 0-1, 2-3: the all-to-alls) inside one node
    processes = json.loads((run_dir / "processes.json").read_text())
    nodes = [row["node"] for row in processes["layout"]]
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and set(nodes) == {"127.0.0.3", "127.0.0.2"}
    os.kill(processes["pids"][1], signal.SIGKILL)  # one actor's process: the same layout restarts
    _wait_for(run_dir, proc, restarts=1, steps=6)
    killed_at = two_nodes.worker.kill()  # then a whole node
    out = _finish(proc, run_dir)

    records = read_records(run_dir)
    actor, node = [r for r in records if "restart" in r]
    assert actor["reason"].startswith("actor rank 1 (pid ") and actor["lost_nodes"] == []
    assert actor["old_layout"] == actor["new_layout"] == {"num_actors": 4, "ep_size": 2}
    assert node["lost_nodes"] == ["127.0.0.2"] and node["reason"].startswith("node 127.0.0.2 was lost")
    assert node["old_layout"] == {"num_actors": 4, "ep_size": 2}
    assert node["new_layout"] == {"num_actors": 2, "ep_size": 2}
    for restart in (actor, node):  # at most the steps since the last checkpoint, and the one in flight
        assert 0 <= restart["steps_lost"] <= 4 and restart["step"] % 4 == 0
    noticed_s = node["noticed_at"] - killed_at
    assert noticed_s < 10, f"the loss was noticed {noticed_s:.1f} s after the kill"
    assert "moe-train: layout: 127.0.0.3:" in out and "restart 1/2 after step" in out and "restart 2/2" in out
    assert f"val_loss {records[0]['val_loss']:.4f} -> " in out  # the first attempt's step-0 evaluation
    final = json.loads((run_dir / "processes.json").read_text())
    assert final["nodes"] == ["127.0.0.3", "127.0.0.3"]  # finished on the head node alone
    print(f"\nkilled actor: restart {actor['restart_time_s']:.1f} s, steps lost {actor['steps_lost']}; node loss: "
          f"noticed {noticed_s:.2f} s after SIGKILL, restart {node['restart_time_s']:.1f} s, steps lost "
          f"{node['steps_lost']} (failed at {node['failed_at_step']}, resumed at {node['step']})")

    # until the first loss: the 4 actors on 2 nodes compute what single computes
    single_run = reference.result()
    pool.shutdown()
    single = {r["step"]: r for r in single_run.train_records}
    assert any(r["grad_norm"] > 1.0 for r in single.values())  # the clip acts: the norm itself must match
    for step in range(1, actor["failed_at_step"] + 1):
        before = [r for r in records if r.get("step") == step and "loss" in r][0]
        for key in ("loss", "grad_norm"):
            assert before[key] == pytest.approx(single[step][key], rel=1e-5), (key, step)
    # after the node loss: exactly the steps of a run started from that checkpoint with the smaller layout
    smaller = [o for o in EP4 if not o.startswith(("parallel.num_actors", "parallel.placement"))]
    resumed = train_run(tmp_path / "ref", *smaller, "parallel.num_actors=2", f"train.resume={node['resumed_from']}")
    assert sorted(resumed.losses) == list(range(node["step"] + 1, STEPS + 1))
    run = _losses(records)
    assert {step: run[step] for step in resumed.losses} == resumed.losses
    # and, through both restarts, the weights an uninterrupted single run ends with: layouts sum in other orders,
    # so AdamW steps drift apart by float rounding (measured 4.8e-7 at most after 60 steps, 200x below this)
    got = read_entries(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    want = read_entries(tmp_path / "single" / "checkpoints" / f"step_{STEPS:08d}")
    for key, value in want.items():
        if key.startswith("model/"):
            assert_rel_close(got[key], value, 1e-4, key)


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
    single = train_run(tmp_path / "single", *[o for o in job if not o.startswith("parallel")]).losses
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
    got = _losses(read_records(run_dir))
    assert sorted(got) == list(range(1, steps + 1))
    for step, loss in got.items():
        assert loss == pytest.approx(single[step], rel=1e-5), step
