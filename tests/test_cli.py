"""``moe-train`` as a user runs it: a subprocess with Hydra overrides."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

MOE_TRAIN = str(Path(sys.executable).parent / "moe-train")


def moe_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return subprocess.run([MOE_TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_run_writes_outputs_and_prints_run_dir_last(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = moe_train("experiment=debug", "logger.mode=auto", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == str(run_dir)
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "wandb"} <= {p.name for p in run_dir.iterdir()}
    assert list((run_dir / "wandb").glob("offline-run-*")), "no API key: W&B must run offline"
    assert "moe:" in (run_dir / "config.yaml").read_text()


def test_help_and_cfg_job_show_the_public_settings(tmp_path: Path) -> None:
    proc = moe_train("--cfg", "job", "moe.num_experts=16", "parallel.num_actors=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "num_experts: 16" in proc.stdout and "num_actors: 3" in proc.stdout
    helped = moe_train("--help", cwd=tmp_path)
    assert helped.returncode == 0 and "parallel: data_parallel, disaggregated, expert_parallel, single" in helped.stdout


BAD_INPUTS = [
    ("moe.top_k=9", "moe.top_k"),
    ("moe.top_k=0", "moe.top_k"),
    ("moe.capacity_factor=0", "moe.capacity_factor"),
    ("moe.num_experts=-1", "moe.num_experts"),
    ("parallel=ring_allreduce", "parallel"),
    ("data.paths=[/nonexistent/corpus.txt]", "data.paths"),
    ("train.max_steps=-5", "train.max_steps"),
    ("moe.topk=2", "moe.topk"),
    ("model.n_heads=5", "model.n_heads"),
    ("data.seq_len=4096", "data.seq_len"),
    ("logger.mode=loud", "logger.mode"),
]


@pytest.mark.parametrize("override,setting", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_clearly_and_writes_nothing(tmp_path: Path, override: str, setting: str) -> None:
    run_dir = tmp_path / "out" / "run"
    proc = moe_train("experiment=debug", "logger.mode=offline", f"hydra.run.dir={run_dir}", override, cwd=tmp_path)
    assert proc.returncode != 0
    assert setting in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not run_dir.exists(), f"left behind: {list(run_dir.rglob('*'))}"
    assert not (tmp_path / "wandb").exists()


def test_unreachable_cluster_address_fails_fast_with_the_address(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    start = time.monotonic()
    proc = moe_train("experiment=debug", "parallel=expert_parallel", "cluster.address=127.0.0.1:9",
                     "cluster.connect_timeout_s=5", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert time.monotonic() - start < 30
    assert proc.returncode != 0
    assert "cluster.address" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert not run_dir.exists()
