"""The one-GPU check runs with torch alone: here on the CPU, with every other dependency blocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# what the borrowed GPU machine lacks; importing any of them fails there
BLOCKED = ("hydra", "omegaconf", "deepspeed", "ray", "wandb", "datasets", "psutil")
RUN = f"""  # python -c RUN MODULE ARGS: MODULE.main(ARGS) with only what the GPU machine has
import importlib.abc, sys

class Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)")
        return None

sys.meta_path.insert(0, Missing())

import subprocess

def no_interpreter(*args, **kwargs):  # a child interpreter would escape the blocked imports above
    raise AssertionError("the GPU check started a process: " + repr(args[:1] or kwargs))

subprocess.Popen = no_interpreter
import importlib
code = importlib.import_module(sys.argv[1]).main(sys.argv[2:])
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
assert "moe_trainer.plan.baseline" not in sys.modules  # the memory plan measures a Ray rank in a child
sys.exit(code)
"""


def test_gpu_check_runs_on_cpu_with_torch_only(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOE_TRAINER_CACHE": str(tmp_path)}  # no cached measurement
    proc = subprocess.run([sys.executable, "-c", RUN, "benchmarks.gpu_check", "--device", "cpu", "--quick", "--profile",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"]
    runs = {(r["strategy"], r["precision"]): r for r in result["runs"]}
    assert set(runs) == {(s, p) for s in ("single", "expert_parallel") for p in ("fp32", "bf16")}
    # fp32 on the CPU is the reference itself: the one-rank all-to-all path must give the same numbers
    assert runs["expert_parallel", "fp32"]["losses"] == result["reference_losses"]
    assert runs["expert_parallel", "fp32"]["a2a_ms"] > 0 and runs["single", "fp32"]["a2a_ms"] == 0
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_mb"] > 0 for r in result["runs"])
    assert result["profile"]["top"] and result["profile"]["busy_ms_per_step"] > 0
    assert result["experts"][0]["path"] in ("grouped_mm", "mm loop") and result["experts"][0]["layer_ms"] > 0


def test_gpu_noise_check_runs_on_cpu_with_torch_only(tmp_path: Path) -> None:
    """benchmarks/gpu_noise_check.py: the selection noise's device check, on the CPU path."""
    out = tmp_path / "gpu_noise_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MOE_TRAINER_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", RUN, "benchmarks.gpu_noise_check", "--device", "cpu", "--quick",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["torch"]
    assert result["no_host_sync"] and len(result["same_bits"]) == 10 and all(result["same_bits"].values())
    assert result["cost"][0]["noise_ms"] > 0 and result["cost"][0]["topk_ms"] > 0
