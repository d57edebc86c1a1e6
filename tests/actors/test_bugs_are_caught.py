"""The equivalence tests bite: inject known gradient bugs into a copy of the code and watch them fail.

Each mutation edits one place of a copy of the source tree. A driver process started in
that copy (``python -m tests.actors.equivalence``) runs one equivalence case on the
session's Ray cluster: its Ray job's workers import the driver's directory first, so the
actors run the mutated code. Its trace is compared with the unmutated ``single``
reference by the same assertion the equivalence tests use, which must fail on the
quantity the bug corrupts. Without the mutation the same case passes in
``tests/actors/test_equivalence.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import ray

from tests.actors.equivalence import FP32, assert_same_run, load_trace

ROOT = Path(__file__).resolve().parents[2]
TREE = ("moe_trainer", "actors", "conf", "tests")


@dataclass(frozen=True)
class Mutation:
    path: str  # file of the copy to edit
    original: str  # text that must occur exactly once
    mutated: str
    layout: str  # the equivalence case (layout, mix) that must fail
    mix: str
    caught_by: str  # regular expression the failing assertion's message matches
    # the smallest relative difference that is the bug's and not rounding past the tolerance (FP32: 1e-5)
    least: float = 1e-2


MUTATIONS = {
    "dense_grads_not_divided_by_world": Mutation(
        "moe_trainer/parallel/context.py",
        "for g in dense + expert:\n            g.div_(self.dp_world)",
        "for g in expert:\n            g.div_(self.dp_world)",
        "data_parallel", "capacity", "relative difference"),
    "expert_grads_not_reduced_over_expert_data_parallel_group": Mutation(
        "moe_trainer/parallel/context.py",
        "if self.groups.replicas > 1:",
        "if False:",
        "expert_parallel_4_ep2", "capacity", "relative difference"),
    "expert_grads_doubled": Mutation(
        "moe_trainer/parallel/context.py",
        "for g in dense + expert:\n            g.div_(self.dp_world)",
        "for g in dense + expert:\n            g.div_(self.dp_world)\n"
        "        for g in expert:\n            g.mul_(2.0)",
        "expert_parallel", "dropless", "relative difference"),
    "expert_actor_does_not_regroup_two_coordinators_rows": Mutation(
        "moe_trainer/parallel/protocol.py",
        "one_peer = recv_counts_PL.shape[0] == 1",
        "one_peer = True",
        # one expert actor serving both coordinators (all experts, every row regrouped): it runs rows of both
        # through the wrong experts, so the first gradient it shows in moves by 1.1e-2 (1000x the tolerance;
        # 2.9e-3 with two expert actors, disaggregated_2c_2mb, which also starts one process more)
        "disaggregated_2c_1e_2mb", "dropless", "relative difference", least=3e-3),
    "bias_update_from_local_counts": Mutation(
        "moe_trainer/train/trainer.py",
        "zip(self.model.moe_layers(), counts.tokens_per_expert_LE, strict=True)",
        "zip(self.model.moe_layers(), parts.local_counts.tokens_per_expert_LE, strict=True)",
        # each replica nudges its own bias: rank 1's routing drifts from rank 0's (which reports the
        # bias), and the per-step losses, loads or biases stop matching single's
        "data_parallel", "dropless", r"(loss|bias|expert loads|grad_norm|drops) at step"),
    "selection_noise_keyed_by_local_row": Mutation(
        "moe_trainer/moe/routing_noise.py",
        "prefix_BS = torch.cumsum(idx_BS.to(torch.int64) * weights_S, dim=1)",
        "prefix_BS = torch.arange(idx_BS.shape[0], device=idx_BS.device)[:, None] + 0 * idx_BS",
        # the noise keyed by a row's index in its rank's batch, not by its tokens: rank 1's rows draw
        # rank 0's noise and some route elsewhere than in single; the first gradient moves by 2.4e-3
        # (240x the tolerance: a few of 64 tokens' choices, not all of a gradient as the bugs above)
        "data_parallel", "dropless", r"((loss|expert loads|grad_norm|bias) at step|relative difference)",
        least=1e-3),
    "sharded_update_not_broadcast": Mutation(
        "moe_trainer/parallel/zero.py",
        "if bucket.owner != self.rank:\n            for t, part in",
        "if False:\n            for t, part in",
        # ZeRO-1: every rank updates only what it owns; a rank that drops the owners' broadcasts trains on with
        # stale copies of the others' parameters from step 2 on (its rows' losses, and the state rank 0 saves)
        "data_parallel_zero", "capacity", r"((loss|grad_norm) at step 2|relative difference)"),
}


CONTROL = "unmutated"  # the control case's key among the drivers' results
CONTROL_CASE = ("data_parallel", "dropless")


def copy_tree(root: Path) -> Path:
    copy = root / "tree"
    for name in TREE:
        shutil.copytree(ROOT / name, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return copy


def mutated_copy(root: Path, mutation: Mutation) -> Path:
    copy = copy_tree(root)
    target = copy / mutation.path
    text = target.read_text()
    assert text.count(mutation.original) == 1, f"{mutation.path}: the code to mutate changed; update this test"
    target.write_text(text.replace(mutation.original, mutation.mutated))
    return copy


def trace_in(copy: Path, layout: str, mix: str, gcs_address: str) -> Any:
    """One equivalence case run by a driver started in ``copy``, whose actors import ``copy``."""
    out = copy.parent / "trace.pt"
    env = {**os.environ, "PYTHONPATH": str(copy), "RAY_ADDRESS": gcs_address}
    proc = subprocess.run([sys.executable, "-m", "tests.actors.equivalence", layout, mix, str(out)],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the run in {copy} failed:\n{(proc.stdout + proc.stderr)[-3000:]}"
    return load_trace(out)


def selected(session: pytest.Session) -> set[str]:
    """The cases whose tests this session runs (``-k`` may select a few): the control and mutation names."""
    here = [item for item in session.items if item.path == Path(__file__)]
    names = {item.callspec.params["name"] for item in here if hasattr(item, "callspec")}
    return names | ({CONTROL} if any(item.name == "test_an_unmutated_copy_passes" for item in here) else set())


def start_drivers(tmp_path_factory: pytest.TempPathFactory, cases: set[str],
                  at_once: int) -> tuple[dict[str, Future[Any]], ThreadPoolExecutor]:
    """Every selected case's driver (the control and each mutation), ``at_once`` at a time in the background.

    Started by ``tests/conftest.py``'s ``bug_drivers`` once the other Ray strategy tests are done, so
    they run beside the single-process tests that follow (on the core those leave idle), and this
    module, which the session runs last, mostly collects results. The session cluster has room for a
    driver's actors (0.5 CPU each) beside the other tests'.
    """
    gcs = ray.get_runtime_context().gcs_address
    todo = {CONTROL: (copy_tree(tmp_path_factory.mktemp(CONTROL)), *CONTROL_CASE)} if CONTROL in cases else {}
    for name, mutation in MUTATIONS.items():
        if name in cases:
            todo[name] = (mutated_copy(tmp_path_factory.mktemp(name), mutation), mutation.layout, mutation.mix)
    pool = ThreadPoolExecutor(max_workers=at_once)
    return {name: pool.submit(trace_in, *case, gcs) for name, case in todo.items()}, pool


@pytest.mark.slow
def test_an_unmutated_copy_passes(bug_drivers: dict[str, Future[Any]], reference: Any) -> None:
    """The control: the copy-and-driver path itself computes what single computes, so a failure
    below is the injected bug's, not the path's (data_parallel with the bias, a mutated case)."""
    assert_same_run(bug_drivers[CONTROL].result(), reference(CONTROL_CASE[1]), FP32)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_equivalence_fails_when_a_gradient_bug_is_injected(bug_drivers: dict[str, Future[Any]], reference: Any,
                                                           name: str) -> None:
    mutation = MUTATIONS[name]
    got = bug_drivers[name].result()
    with pytest.raises(AssertionError, match=mutation.caught_by) as caught:
        assert_same_run(got, reference(mutation.mix), FP32)
    size = re.search(r"relative difference ([0-9.e+-]+)", str(caught.value))
    if size:  # a gradient bug, not rounding just past the tolerance
        assert float(size.group(1)) > mutation.least, str(caught.value)
    print(f"{name}: {str(caught.value).splitlines()[0]}")
