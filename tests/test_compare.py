"""The README's strategy comparison: a Hydra multirun of the three Ray strategies, then moe-report on it.

No ``cluster.address``: the sweep starts the embedded local Ray the README's first command uses
(token auth on, every process on loopback) and its three jobs share it, so this is also each Ray
strategy out of the box. Its console, both streams merged in the order they were written, is also
the test of what a Ray run shows (issue 15): each phase line, then the final lines, and nothing
else (one ``moe-train`` of a Ray strategy, embedded Ray and actor start-ups paid once, not twice).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from moe_trainer.logging import STEP_METRIC, read_offline_run
from moe_trainer.report.dashboard import WORKSPACE_FILE
from tests.helpers import read_records

BIN = Path(sys.executable).parent
TINY = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2", "model.ffn_hidden=64", "moe.num_experts=4",
        "moe.top_k=2", "moe.expert_hidden=32", "data.seq_len=32", "data.embedded_max_bytes=300000",
        "train.batch_size=4", "train.max_steps=4", "train.eval_every=2", "train.eval_batches=2",
        "logger.progress=false",
        "train.checkpoint_every=4"]  # a checkpoint in each run dir, as a run of the debug experiment writes
ACTORS = {"data_parallel": "2 actors (data_parallel, 0.5 CPU each)",
          "expert_parallel": "2 actors (expert_parallel, 0.5 CPU each)",
          "disaggregated": "3 actors (disaggregated: 1 coordinator with 0.5 CPU, 2 expert actors with 0.5 CPU each)"}


def console_lines(runs: list[Path]) -> list[str]:
    """How each line of the sweep's console starts, in order (the step lines aside; a run dir is a whole line):
    Hydra's launch lines, Ray's start-up once, each job's actors and their layout (one node), then its final
    lines."""
    want = ["[HYDRA] Launching 3 jobs locally"]
    for i, (run, (strategy, actors)) in enumerate(zip(runs, ACTORS.items(), strict=True)):
        want.append(f"[HYDRA] \t#{i} : parallel={strategy} experiment=compare_strategies ")
        if i == 0:
            want += ["moe-train: connecting to Ray (embedded, 127.0.0.1)", "moe-train: connected to Ray ("]
        want += [f"moe-train: starting {actors}: ", f"moe-train: {actors.split(' (')[0]} joined their process group (",
                 "moe-train: layout: 127.0.0.1: rank 0 ", "moe-train: first step done, ", "done: 4 steps, val_loss ",
                 "W&B offline run; upload it with: ", str(run)]
    return want


def assert_view_reads_what_was_logged(path: Path, history: dict[str, set[str]],
                                      summaries: dict[str, set[str]]) -> None:
    """Every key a panel of the saved view reads was logged by every run (the disaggregated roles' keys by its
    run); the view shows the sweep's group, one line per strategy."""
    view = json.loads(path.read_text())
    (runset,) = view["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "run", "name": "jobType"}]
    assert [(f["key"]["name"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == [
        ("group", "=", "compare_strategies")]
    panels = [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]
    lines = [p["config"] for p in panels if p["viewType"] == "Run History Line Plot"]
    bars = [p["config"] for p in panels if p["viewType"] == "Bar Chart"]  # a bar per run: its summary value
    assert len(lines) + len(bars) == len(panels) >= 30
    read = {k for c in lines for k in [*c["metrics"], c["xAxis"]]}
    assert "balance/layer1/tokens_per_expert" in read and STEP_METRIC in read
    for key in read:
        if key.startswith("roles/"):
            assert key in history["2-disaggregated"], key
        else:
            assert all(key in logged for logged in history.values()), key
    for key in (k for c in bars for k in c["metrics"]):
        assert all(key in logged for logged in summaries.values()), key


def assert_what_the_strategy_moves_and_holds(strategy: str, summary: dict[str, Any], records: list[dict[str, Any]],
                                            trace: dict[str, Any]) -> None:
    """data_parallel: every actor holds every expert, no token moves, gradients are synchronised.
    expert_parallel: each of the 2 actors holds half the experts, tokens really cross ranks (each rank sends rows to
    the other in dispatch and gets them back in combine), and step 2's timeline holds each rank's compute and
    transfers. Every record is a training step's."""
    assert records, strategy  # the checks over records below must not pass on none
    if strategy == "data_parallel":
        assert summary["expert_params_per_actor"] == [summary["params_experts"]] * 2
        assert all(r["a2a_rows_sent"] == 0 for r in records)
        assert all(r["grad_sync_time_s_max"] > 0 for r in records)
    elif strategy == "expert_parallel":
        assert summary["expert_range_per_actor"] == [[0, 2], [2, 2]]  # moe.num_experts=4
        assert summary["expert_params_per_actor"] == [summary["params_experts"] // 2] * 2
        for record in records:
            assert all(n > 0 for n in record["a2a_dispatch_rows_sent_per_rank"])
            assert sum(record["a2a_dispatch_rows_sent_per_rank"]) == sum(record["a2a_dispatch_rows_recv_per_rank"])
            assert record["a2a_bytes_sent"] > 0
        names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
        assert names == {0: "rank 0 · trainer", 1: "rank 1 · trainer"}
        for rank in (0, 1):
            spans = {(e["name"], e["cat"]) for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == rank}
            assert {("forward", "compute"), ("dispatch", "transfer"), ("combine_bwd", "transfer"),
                    ("grad sync", "sync")} <= spans, rank
    else:  # the third strategy of the sweep: its roles and expert regions are checked by the caller
        assert strategy == "disaggregated", strategy


@pytest.mark.slow
def test_multirun_of_three_strategies_logs_the_same_keys_and_reports(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun"
    # out of the box: no W&B key (W&B offline), Ray's own auth and colour settings left to moe-train
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "RAY_AUTH_MODE", "RAY_COLOR_PREFIX")}
    proc = subprocess.run([str(BIN / "moe-train"), "-m", "experiment=compare_strategies", *TINY,
                           f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600)
    console = proc.stdout  # both streams, in the order they were written
    assert proc.returncode == 0, console[-3000:]
    runs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in runs] == ["0-data_parallel", "1-expert_parallel", "2-disaggregated"]
    for noise in ("Setting accelerator to CPU", "Token authentication", "\x1b["):  # \x1b[: colour codes in a file
        assert noise not in console, noise
    assert console.count("moe-train: connecting to Ray") == 1 and console.count("actors joined") == 3

    # what a Ray run shows (issue 15): each start-up phase, then the final lines, and nothing else: no
    # DeepSpeed, Ray or datasets noise, no actor line forwarded late, no shutdown notice after the last line
    lines = [re.sub(r"^\[[-0-9 :,]+\](?=\[HYDRA\] )", "", line) for line in console.splitlines()]  # Hydra's time
    shown = [line for line in lines if not re.fullmatch(r"step \d+: val_loss \S+", line)]
    want = console_lines(runs)
    assert len(shown) == len(want) and all(line.startswith(w) for line, w in zip(shown, want, strict=True)), shown
    assert [line for line in shown if line.startswith(str(sweep))] == [str(run) for run in runs]
    assert lines[-1] == str(runs[-1])

    # the sweep's jobs share one embedded Ray (started by the first, stopped at exit)
    assert len({json.loads((run / "processes.json").read_text())["ray_gcs_address"] for run in runs}) == 1
    keys, metric_keys, history, summaries = {}, {}, {}, {}
    for run, processes in zip(runs, (2, 2, 3), strict=True):
        summary = json.loads((run / "summary.json").read_text())
        assert summary["processes"] == processes and summary["backend"] == "gloo", run.name
        assert {"config.yaml", "metrics.jsonl", "checkpoints", "wandb"} <= {p.name for p in run.iterdir()}, run.name
        assert not (run / "cli.log").exists(), "Hydra's job log would stay empty: it is not written"
        assert "moe:" in (run / "config.yaml").read_text()
        # security default of the embedded Ray: every process on loopback
        assert set(json.loads((run / "processes.json").read_text())["nodes"]) == {"127.0.0.1"}, run.name
        (offline,) = sorted((run / "wandb").glob("offline-run-*"))
        logged = read_offline_run(offline)
        assert logged.group == "compare_strategies" and logged.job_type == run.name.split("-", 1)[1]
        history[run.name], summaries[run.name] = set(logged.metric_keys()), set(logged.summary)
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
        assert_what_the_strategy_moves_and_holds(run.name.split("-", 1)[1], summary,
                                                 [r for r in records if "loss" in r], trace)
    assert len({frozenset(v) for v in keys.values()}) == 1, keys  # one dashboard fits every strategy
    assert len({frozenset(v) for v in metric_keys.values()}) == 1
    assert {"comm/a2a_bytes_sent", "comm/comm_share", "balance/load_imbalance", "perf/tokens_per_s",
            "balance/layer0/tokens_per_expert"} <= keys["0-data_parallel"]

    # the local report, and the W&B workspace view of the group (issue 21), written offline
    report = subprocess.run([str(BIN / "moe-report"), str(sweep), "--out", str(tmp_path / "report"), "--wandb",
                             "test-team/moe-trainer"], capture_output=True, text=True, timeout=300,
                            env={**{k: v for k, v in env.items() if not k.startswith("WANDB_")},
                                 "NETRC": str(tmp_path / "no-netrc")})
    assert report.returncode == 0, report.stderr
    assert_view_reads_what_was_logged(tmp_path / "report" / WORKSPACE_FILE, history, summaries)
    written = {p.name for p in (tmp_path / "report").iterdir()}
    assert {"tokens_per_s.png", "comm_share.png", "load_imbalance.png", "loss_vs_step.png", "loss_vs_tokens.png",
            "summary.md", "summary.html"} <= written
    assert sum(name.startswith("expert_load_") for name in written) == 3 * 2  # runs x MoE layers
    assert sum(name.startswith("timeline_") and name.endswith("_step000002.png") for name in written) == 3
    table = (tmp_path / "report" / "summary.md").read_text()
    for strategy in ("data_parallel", "expert_parallel", "disaggregated"):
        assert strategy in table
