"""The communication module's process setup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

JOIN = """
import torch
from moe_trainer.parallel.comm import dist, one_rank_group
with one_rank_group("gloo"):
    x = torch.arange(4.0)
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x)
    assert torch.equal(out, x)
import deepspeed.ops
from deepspeed.accelerator import get_accelerator
assert get_accelerator().create_op_builder("ShareMemCommBuilder") is not None  # the CPU has the op ...
assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False  # ... and it was marked unused
"""


def test_joining_a_group_builds_no_deepspeed_op(tmp_path: Path) -> None:
    """DeepSpeed's CPU shared-memory op (inference all-reduce only) is never compiled: no extension
    directory appears, whatever cache or ``ninja`` the process finds (a build took 36-118 s on 2 cores)."""
    cache = tmp_path / "torch_extensions"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", JOIN], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not cache.exists(), sorted(p.name for p in cache.rglob("*"))
    assert "built successfully" not in out.stdout + out.stderr
