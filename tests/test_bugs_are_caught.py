"""The equivalence tests bite: inject known gradient bugs into a copy of the code and watch them fail.

Each mutation edits one place of a copy of the source tree, then runs one test of
``tests/actors/test_equivalence.py`` on that copy in a fresh pytest process (its own
Ray cluster; the actors import the mutated code through ``PYTHONPATH``). The test must
fail, on the assertion that names the quantity the bug corrupts. Without the mutation
the same test passes in the normal suite.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREE = ("moe_trainer", "actors", "launch", "conf", "tests", "pyproject.toml")
EQUIVALENCE = "tests/actors/test_equivalence.py::test_layout_computes_what_single_computes"


@dataclass(frozen=True)
class Mutation:
    path: str  # file of the copy to edit
    original: str  # text that must occur exactly once
    mutated: str
    test: str  # the equivalence case that must fail
    caught_by: str  # regular expression the failing assertion's message matches


MUTATIONS = {
    "dense_grads_not_divided_by_world": Mutation(
        "moe_trainer/parallel/context.py",
        "for g in dense + expert:\n            g.div_(self.dp_world)",
        "for g in expert:\n            g.div_(self.dp_world)",
        "data_parallel-capacity", "relative difference"),
    "expert_grads_not_reduced_over_expert_data_parallel_group": Mutation(
        "moe_trainer/parallel/context.py",
        "if self.groups.replicas > 1:",
        "if False:",
        "expert_parallel_4_ep2-capacity", "relative difference"),
    "expert_grads_doubled": Mutation(
        "moe_trainer/parallel/context.py",
        "for g in dense + expert:\n            g.div_(self.dp_world)",
        "for g in dense + expert:\n            g.div_(self.dp_world)\n"
        "        for g in expert:\n            g.mul_(2.0)",
        "expert_parallel-dropless", "relative difference"),
    "bias_update_from_local_counts": Mutation(
        "moe_trainer/train/trainer.py",
        "zip(self.model.moe_layers(), counts.tokens_per_expert_LE, strict=True)",
        "zip(self.model.moe_layers(), parts.local_counts.tokens_per_expert_LE, strict=True)",
        # each replica nudges its own bias: rank 1's routing drifts from rank 0's (which reports the
        # bias), and the per-step losses, loads or biases stop matching single's
        "data_parallel-dropless", r"(loss|bias|expert loads|grad_norm|drops) at step"),
}


def mutated_copy(root: Path, mutation: Mutation) -> Path:
    copy = root / "tree"
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, copy / name)
    target = copy / mutation.path
    text = target.read_text()
    assert text.count(mutation.original) == 1, f"{mutation.path}: the code to mutate changed; update this test"
    target.write_text(text.replace(mutation.original, mutation.mutated))
    return copy


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_equivalence_fails_when_a_gradient_bug_is_injected(tmp_path: Path, name: str) -> None:
    mutation = MUTATIONS[name]
    copy = mutated_copy(tmp_path, mutation)
    env = {**os.environ, "PYTHONPATH": str(copy)}
    test_id = f"{EQUIVALENCE}[{mutation.test}]"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", test_id],
                          cwd=copy, env=env, capture_output=True, text=True, timeout=420)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, f"{name}: expected the test to fail, pytest exited {proc.returncode}:\n{out[-3000:]}"
    assert f"FAILED {test_id}" in out, out[-3000:]
    assert re.search(mutation.caught_by, out), f"{name} failed, but not on '{mutation.caught_by}':\n{out[-3000:]}"
