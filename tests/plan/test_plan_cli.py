"""``moe-train ... --plan`` prints the plan and starts nothing; an over-budget start is refused with the fix."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from moe_trainer.config.schema import to_dataclass
from moe_trainer.plan.memory_plan import build_plan
from tests.conftest import compose_dict

# the entry point as the console script runs it, once per argument list, in one interpreter; then
# whether anything started Ray in it
RUNS = """
import contextlib, io, json, sys
from moe_trainer.cli import main
results = []
for args in json.loads(sys.argv[1]):
    sys.argv, out, err, code = ["moe-train", *args], io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
ray = sys.modules.get("ray")
print(json.dumps({"results": results, "ray_started": bool(ray and ray.is_initialized())}))
"""
# big activations (64 sequences of 512 tokens) on a tiny model: recompute=block is what brings it down
HEAVY = ["experiment=debug", "parallel=expert_parallel", "parallel.num_actors=2", "model.max_seq_len=512",
         "data.seq_len=512", "train.batch_size=64"]


def run_entry_point(argv: list[list[str]], cwd: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    proc = subprocess.run([sys.executable, "-c", RUNS, json.dumps(argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return found


def test_plan_prints_every_rank_and_starts_nothing_and_an_over_budget_start_is_refused(tmp_path: Path) -> None:
    heavy = to_dataclass(compose_dict(HEAVY))
    none = build_plan(heavy).largest().total
    block = build_plan(to_dataclass(compose_dict([*HEAVY, "train.recompute=block"]))).largest().total
    assert none - block > 50 * 2**20  # room for a budget between the two
    budget_gb = (none + block) / 2 / 2**30  # fits with recompute=block, not without
    budget = f"parallel.memory_per_actor_gb={budget_gb:.3f}"
    found = run_entry_point([
        [*HEAVY, "--plan"],
        [*HEAVY, budget, "--plan"],
        [*HEAVY, budget, f"hydra.run.dir={tmp_path / 'run'}"],
    ], tmp_path)
    fits, refused_plan, refused = found["results"]
    assert fits["code"] == 0, fits["stderr"]
    table = fits["stdout"]
    assert "memory plan: parallel.strategy=expert_parallel" in table
    assert re.search(r"^0-1 +actor +0-1\|2-3 ", table, re.MULTILINE), table  # both ranks, each with its experts
    for column in ("params", "grads", "optimizer", "act none*", "act attention", "act block", "comm", "baseline"):
        assert column in table
    assert ": fits" in table
    assert refused_plan["code"] == 2 and "does NOT fit" in refused_plan["stdout"]
    assert "try train.recompute=block" in refused_plan["stderr"]
    assert refused["code"] == 2
    line = refused["stderr"]
    assert line.startswith("moe-train: invalid setting: parallel.memory_per_actor_gb=") and line.count("\n") == 1
    assert "the memory plan needs" in line and "ranks 0-1 (actor): params" in line, line
    assert "try train.recompute=block" in line, line
    assert not found["ray_started"]
    assert list(tmp_path.iterdir()) == [], "a plan or a refused start wrote something"
