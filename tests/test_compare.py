"""The README's strategy comparison: a Hydra multirun of the three Ray strategies, then moe-report on it.

No ``cluster.address``: the sweep starts the embedded local Ray the README's first command uses
(token auth on, every process on loopback) and its three jobs share it, so this is also each Ray
strategy out of the box.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_trainer.logging import read_offline_run
from tests.helpers import read_records

BIN = Path(sys.executable).parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "moe.num_experts=4",
        "moe.expert_hidden=32", "data.seq_len=32", "data.embedded_max_bytes=300000", "train.batch_size=4",
        "train.max_steps=4", "train.eval_every=2", "train.eval_batches=2", "logger.progress=false"]


@pytest.mark.slow
def test_multirun_of_three_strategies_logs_the_same_keys_and_reports(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    proc = subprocess.run([str(BIN / "moe-train"), "-m", "experiment=compare_strategies", *TINY,
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0-data_parallel", "1-expert_parallel", "2-disaggregated"]
    # a quiet console in a sweep too: the last job's run dir is the last line, no per-process warnings
    assert proc.stdout.strip().splitlines()[-1] == str(runs[-1])
    for noise in ("Setting accelerator to CPU", "Token authentication", "\x1b["):
        assert noise not in proc.stdout + proc.stderr, noise
    assert proc.stderr.count("moe-train: connecting to Ray") == 1 and proc.stderr.count("actors joined") == 3

    # the sweep's jobs share one embedded Ray (started by the first, stopped at exit)
    assert len({json.loads((run / "processes.json").read_text())["ray_gcs_address"] for run in runs}) == 1
    keys, metric_keys = {}, {}
    for run, processes in zip(runs, (2, 2, 3), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["processes"] == processes and summary["backend"] == "gloo", run.name
        # security default of the embedded Ray: every process on loopback
        assert set(json.loads((run / "processes.json").read_text())["nodes"]) == {"127.0.0.1"}, run.name
        (offline,) = sorted((run / "wandb").glob("offline-run-*"))
        logged = read_offline_run(offline)
        assert logged.group == "compare_strategies" and logged.job_type == run.name.split("-", 1)[1]
        keys[run.name] = {k for k in logged.metric_keys() if not k.startswith("roles/")}
        records = read_records(run)
        metric_keys[run.name] = {k for r in records if "loss" in r for k in r if not k.startswith(("coord_",
                                                                                                    "expert_"))}
        assert "params_total" in logged.summary and "mem_rss_mb_per_process" in logged.summary
        # step 2's timeline: every rank, disaggregated expert actors included (their expert compute)
        trace = json.loads((run / "timelines" / "step_000002.json").read_text())
        roles = json.loads((run / "processes.json").read_text())["roles"]
        regions = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert set(range(len(roles))) == {e["pid"] for e in regions}, run.name
        for rank, role in enumerate(roles):
            if role == "experts":
                assert {"experts forward", "experts backward"} <= {e["name"] for e in regions if e["pid"] == rank}
        assert (offline / "files" / "timelines" / "step_000002.json").is_file(), run.name
    assert len({frozenset(v) for v in keys.values()}) == 1, keys  # one dashboard fits every strategy
    assert len({frozenset(v) for v in metric_keys.values()}) == 1
    assert {"comm/a2a_bytes_sent", "comm/comm_share", "balance/load_imbalance", "perf/tokens_per_s",
            "balance/layer0/tokens_per_expert"} <= keys["0-data_parallel"]

    report = subprocess.run([str(BIN / "moe-report"), str(sweep), "--out", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"tokens_per_s.png", "comm_share.png", "load_imbalance.png", "loss_vs_step.png", "loss_vs_tokens.png",
            "summary.md", "summary.html"} <= written
    assert sum(name.startswith("expert_load_") for name in written) == 3 * 2  # runs x MoE layers
    assert sum(name.startswith("timeline_") and name.endswith("_step000002.png") for name in written) == 3
    table = (tmp_path / "report" / "summary.md").read_text()
    for strategy in ("data_parallel", "expert_parallel", "disaggregated"):
        assert strategy in table
