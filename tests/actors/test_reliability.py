"""Resharding a checkpoint across strategies and actor counts; stopping together; stalled collectives.

A killed actor and a lost node: tests/actors/test_multi_node.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
import torch

import actors.group as group_module
from actors.engine import RayEngine
from moe_trainer.config.errors import CollectiveError
from moe_trainer.config.schema import MoEConfig, to_dataclass
from moe_trainer.parallel.setup import world_size
from moe_trainer.train.sharded_checkpoint import read_entries
from tests.actors.equivalence import RUN, RUN_LAYOUTS, RUN_STEPS, WarmActors
from tests.conftest import compose_dict
from tests.helpers import assert_rel_close, train_run

# routing groups are whole sequences, so every layout computes the same function (docs/architecture.md)
STEPS = RUN_STEPS  # checkpoints at steps 5 and 10


def run(run_dir: Path, *overrides: str) -> dict[int, float]:
    return train_run(run_dir, *RUN, *overrides).losses


LAYOUTS = {  # 4 actors -> 2 (exactly the losses of a fresh 2-actor start): tests/actors/test_multi_node.py
    "single": [],
    "disaggregated_1c_2e": ["parallel=disaggregated", "parallel.num_expert_actors=2"],
}


@pytest.mark.slow
def test_checkpoint_from_4_actors_resumes_under_other_layouts(ray_cluster: object, tmp_path: Path) -> None:
    full = run(tmp_path / "ep4", "parallel=expert_parallel", "parallel.num_actors=4")
    saved = tmp_path / "ep4" / "checkpoints"
    mid = read_entries(saved / "step_00000005")
    experts = to_dataclass(compose_dict(["experiment=debug", *RUN])).moe.num_experts
    for layer in (0, 1):  # every expert's Adam moments were written, keyed by global expert index
        for e in range(experts):
            for moment in ("exp_avg", "exp_avg_sq"):
                key = f"optim.{moment}/blocks.{layer}.ffn.experts.w_down_EFD/expert{e}"
                assert key in mid and torch.count_nonzero(mid[key]) > 0
    final = read_entries(saved / f"step_{STEPS:08d}")
    for name, overrides in LAYOUTS.items():
        losses = run(tmp_path / name, *overrides, f"train.resume={saved / 'step_00000005'}")
        assert sorted(losses) == list(range(6, STEPS + 1)), name
        for step, loss in losses.items():
            assert loss == pytest.approx(full[step], rel=1e-5), (name, step)
        resumed = read_entries(tmp_path / name / "checkpoints" / f"step_{STEPS:08d}")
        for key, ref in final.items():  # weights and optimizer moments of every expert carried over
            if key.startswith(("model/", "optim.")):
                # relative: Adam's second moments are ~1e-8, an absolute 1e-6 would pass anything
                assert_rel_close(resumed[key], ref, 1e-4, f"{name}: {key}")


@pytest.mark.slow
def test_background_checkpoints_of_actors_hold_what_blocking_ones_hold(moe_train_run: Any, tmp_path: Path) -> None:
    """``train.async_checkpoint``: each rank copies its entries and writes them in a thread while the next
    steps train (checkpoint collectives on their own gloo group); the step-5 checkpoint must hold step 5."""
    layout = RUN_LAYOUTS["disaggregated_2mb"]  # coordinator and 2 expert actors save
    blocking_dir, blocking = moe_train_run(*layout)  # the blocking run the equivalence tests read too
    background = run(tmp_path / "background", *layout, "train.async_checkpoint=true")
    assert background == blocking.losses
    for step in (5, STEPS):
        want = read_entries(blocking_dir / "checkpoints" / f"step_{step:08d}")
        got = read_entries(tmp_path / "background" / "checkpoints" / f"step_{step:08d}")
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert torch.equal(got[key], value), (step, key)
    assert not list((tmp_path / "background" / "checkpoints").glob(".tmp-*"))


@pytest.fixture(scope="module")
def warm_actors(ray_cluster: object) -> Iterator[WarmActors]:
    """Three TrainWorkers that the engine tests below take in turn (``WarmActors``, as the equivalence tests do):
    a job that ends cleanly leaves its actors to the next test; one that fails leaves them dead or stuck, and the
    next test takes new ones. Each test builds its own group (roles, process group, model) on them. So the failures
    below are met by groups on reused actors, without a placement group; a fresh group's start is tested in
    test_roles.py, and its teardown after a lost actor through ``moe-train`` in test_multi_node.py."""
    actors = WarmActors(3)
    yield actors
    actors.close()


def poison_coordinator(worker: Any) -> None:
    """Runs inside each actor (``__ray_call__``): a NaN weight on the coordinator makes every step non-finite."""
    if worker.setup.role == "coordinator":
        with torch.no_grad():
            worker.setup.runner.model.lm_head.weight[0, 0] = float("nan")


def runner_step(worker: Any) -> int:
    return worker.setup.runner.step


def clear_stop(worker: Any) -> None:
    """Runs inside each actor: forgets a preemption request, so the same actors go on to the next check."""
    worker.stop_requested.clear()


def test_every_rank_stops_at_the_step_a_preemption_or_a_skip_ends(warm_actors: WarmActors, make_config: Any
                                                                   ) -> None:
    # coordinators (TrainWorker) and expert actors (ExpertServer) must leave the chunk together
    cfg = make_config("parallel=disaggregated", "train.on_nan=skip", "train.max_skipped_steps=3",
                      "parallel.timeout_s=60")
    engine = RayEngine(cfg, warm_actors.take(world_size(cfg)))
    try:
        assert not engine.train(1)[0]["step_skipped"]
        # a preemption in the middle of a long chunk: each rank hears it at its own moment, all stop together
        chunk: list[dict[str, Any]] = []
        running = threading.Thread(target=lambda: chunk.extend(engine.train(100_000)))
        running.start()
        time.sleep(1.0)
        engine.request_stop()
        running.join(timeout=60)
        assert not running.is_alive() and 1 <= len(chunk) < 100_000
        base = 1 + len(chunk)
        assert engine.step == base and engine.group.call("__ray_call__", runner_step) == [base] * 3
        engine.group.call("__ray_call__", clear_stop)

        engine.group.call("__ray_call__", poison_coordinator)
        assert [r["step_skipped"] for r in engine.train(2)] == [True, True]
        records = engine.train(5)  # the 3rd skip in a row, counted across chunks, ends this chunk
        assert [(r["step"], r["step_skipped"]) for r in records] == [(base + 3, True)]
        assert engine.group.call("__ray_call__", runner_step) == [base + 3] * 3
        assert engine.nonfinite_state() == ["rank 0: model/lm_head.weight"]
    finally:
        engine.close(keep_cluster=True)


def skip_one_dispatch_key(worker: Any) -> None:
    """Runs inside each actor: coordinator rank 1 numbers its dispatches one ahead of coordinator 0.

    Its headers then name a different dispatch than coordinator 0's for the same message; an
    expert actor that did not compare them would pair the two coordinators' rows of different
    micro-batches and train on them silently.
    """
    if worker.rank == 1:
        worker.setup.runner.model.moe_layers()[0].dispatcher.transport.dispatches += 1


def test_coordinators_that_disagree_stop_the_job_within_seconds(warm_actors: WarmActors, make_config: Any,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    timeout_s = 120  # a rank left waiting for a message would fail only after this
    # the group re-raises the expert actor's error once this grace for the other ranks' outcomes ends (10 s by
    # default); a shorter one keeps the test short and changes nothing else
    monkeypatch.setattr(group_module, "FAILURE_GRACE_S", 2.0)
    cfg = make_config("parallel=disaggregated", "parallel.num_coordinators=2", "parallel.num_expert_actors=1",
                      f"parallel.timeout_s={timeout_s}")
    engine = RayEngine(cfg, warm_actors.take(world_size(cfg)))
    try:
        engine.group.call("__ray_call__", skip_one_dispatch_key)
        start = time.monotonic()
        # the expert actor names the cause; the coordinators, waiting for its replies, are ended by the group
        with pytest.raises(CollectiveError, match="coordinators disagree on the dispatch schedule") as err:
            engine.train(1)
        seconds = time.monotonic() - start
        assert "rank 2:" in str(err.value)
        assert "forward of dispatch 0 (MoE block 0)" in str(err.value), err.value
        assert "forward of dispatch 1 (MoE block 0)" in str(err.value), err.value
        assert seconds < 2.0 + 20, f"{seconds:.1f} s"
        print(f"the job stopped after {seconds:.1f} s (parallel.timeout_s={timeout_s}): {err.value}")
    finally:
        engine.close(keep_cluster=True)


@ray.remote(num_cpus=0.5, max_calls=1)  # a fresh process per rank: process groups are per process
def stalling_rank(rank: int, port: int, timeout_s: float) -> dict[str, Any]:
    from moe_trainer.moe.dispatcher import Dispatcher
    from moe_trainer.moe.layer import MoELayer
    from moe_trainer.parallel.comm import init_process_group, new_group
    from moe_trainer.parallel.dispatcher import AllToAllTransport

    init_process_group("gloo", "127.0.0.1", port, rank, 2, timeout_s)
    group = new_group([0, 1], timeout_s)
    if rank == 1:
        time.sleep(4 * timeout_s)  # never joins the all-to-all
        return {"rank": 1}
    cfg = MoEConfig(num_experts=4, top_k=2, expert_hidden=4)
    layer = MoELayer(8, cfg, Dispatcher(4, None, AllToAllTransport(group, 2, 0, 4)), expert_range=(0, 2))
    layer.layer_index = 3
    start = time.monotonic()
    try:
        layer(torch.randn(1, 6, 8))
    except CollectiveError as err:
        return {"rank": 0, "error": str(err), "seconds": time.monotonic() - start}
    return {"rank": 0, "error": None, "seconds": time.monotonic() - start}


def test_stalled_all_to_all_times_out_naming_rank_collective_and_layer(ray_cluster: object) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    timeout_s = 3.0
    refs = [stalling_rank.remote(r, port, timeout_s) for r in range(2)]
    first = ray.get(refs[0], timeout=120)
    ray.cancel(refs[1], force=True)  # the stalled rank has served its purpose
    assert first["error"] is not None
    assert "rank 0" in first["error"] and "all_to_all" in first["error"] and "MoE block 3" in first["error"]
    assert first["seconds"] < 3 * timeout_s


def test_expert_actor_lost_mid_pipeline_fails_the_coordinators_within_seconds(warm_actors: WarmActors,
                                                                              make_config: Any) -> None:
    """Coordinators with micro-batches in flight to an expert actor that dies fail at once, not at the timeout."""
    timeout_s = 120
    cfg = make_config("parallel=disaggregated", "parallel.num_expert_actors=1", "parallel.micro_batches=4",
                      f"parallel.timeout_s={timeout_s}")
    engine = RayEngine(cfg, warm_actors.take(world_size(cfg)))
    try:
        engine.train(1)
        coordinator, expert_actor = engine.group.actors
        ref = coordinator.train.remote(10_000)  # the expert actor's side is never called: it dies instead
        ray.kill(expert_actor, no_restart=True)
        start = time.monotonic()
        with pytest.raises(CollectiveError, match="rank 0: .*expert actor") as err:
            ray.get(ref, timeout=60)
        seconds = time.monotonic() - start
        assert seconds < 30, f"{seconds:.1f} s"
        print(f"the coordinator failed {seconds:.2f} s after the expert actor's death: {err.value}")
    finally:
        engine.close(keep_cluster=True)
