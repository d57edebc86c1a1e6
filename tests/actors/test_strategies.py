"""Ray strategies: tokens really cross ranks, experts are really sharded, bad input stops before actors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import ray

from moe_trainer.config.errors import ConfigError
from tests.helpers import train_run

FAST = ["train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=0", "train.log_every=1",
        "parallel.cpus_per_actor=0.5"]


def run(run_dir: Path, *overrides: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    result = train_run(run_dir, *FAST, *overrides)
    return result.summary, result.train_records


@pytest.mark.slow
def test_expert_parallel_moves_tokens_and_shards_experts(ray_cluster: object, tmp_path: Path) -> None:
    summary, records = run(tmp_path, "parallel=expert_parallel", "parallel.num_actors=2", "moe.num_experts=4")
    assert summary["expert_range_per_actor"] == [[0, 2], [2, 2]]
    assert summary["expert_params_per_actor"] == [summary["params_experts"] // 2] * 2
    for record in records:
        # each rank sends rows to the other in dispatch and gets them back in combine
        assert all(n > 0 for n in record["a2a_dispatch_rows_sent_per_rank"])
        assert sum(record["a2a_dispatch_rows_sent_per_rank"]) == sum(record["a2a_dispatch_rows_recv_per_rank"])
        assert record["a2a_bytes_sent"] > 0
    # step 2's timeline holds both ranks, each with its compute and its transfers (logger.timeline_every=50)
    trace = json.loads((tmp_path / "timelines" / "step_000002.json").read_text())
    names = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"] if e["name"] == "process_name"}
    assert names == {0: "rank 0 · trainer", 1: "rank 1 · trainer"}
    for rank in (0, 1):
        spans = {(e["name"], e["cat"]) for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == rank}
        assert {("forward", "compute"), ("dispatch", "transfer"), ("combine_bwd", "transfer"),
                ("grad sync", "sync")} <= spans, rank


@pytest.mark.slow
def test_data_parallel_holds_all_experts_and_moves_no_tokens(ray_cluster: object, tmp_path: Path) -> None:
    summary, records = run(tmp_path, "parallel=data_parallel", "parallel.num_actors=2")
    assert summary["expert_params_per_actor"] == [summary["params_experts"]] * 2
    assert all(r["a2a_rows_sent"] == 0 for r in records)
    assert all(r["grad_sync_time_s_max"] > 0 for r in records)


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["parallel=expert_parallel", "parallel.num_actors=2", "moe.num_experts=5"], "moe.num_experts"),
        (["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=3"], "parallel.ep_size"),
        (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.ep_size=4"], "parallel.ep_size"),
        (["parallel=data_parallel", "parallel.num_actors=3"], "train.batch_size"),
    ],
)
def test_bad_parallel_settings_fail_before_any_actor(tmp_path: Path, overrides: list[str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(tmp_path, *overrides)
    assert err.value.setting == setting
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "overrides,setting,available",
    [
        (["parallel.num_actors=16"], "parallel.num_actors", "has 4"),
        (["parallel.num_actors=2", "parallel.gpus_per_actor=1"], "parallel.gpus_per_actor", "has 0"),
    ],
)
def test_more_than_the_cluster_has_says_what_is_available(ray_cluster: object, tmp_path: Path,
                                                          overrides: list[str], setting: str, available: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(tmp_path, "parallel=data_parallel", "train.batch_size=16", *overrides)
    assert err.value.setting == setting and available in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")  # no actor was started
