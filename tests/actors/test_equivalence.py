"""Every Ray strategy matches the single-process reference, step by step, in loss and parameters.

Real Ray actors, real DeepSpeed (gloo) process groups. The reference splits its
batch into as many routing groups as the strategy has data-parallel ranks (see
docs/architecture.md, "Routing groups"), so both compute the same function.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf

from moe_trainer.cli import train
from moe_trainer.config.schema import to_dataclass
from moe_trainer.train.sharded_checkpoint import read_entries
from tests.conftest import compose_dict

STEPS = 10
COMMON = [f"train.max_steps={STEPS}", f"train.eval_every={STEPS}", "train.checkpoint_every=0", "train.log_every=1",
          "train.batch_size=8", "parallel.cpus_per_actor=0.5"]


def run(run_dir: Path, *overrides: str) -> tuple[dict[int, float], dict[str, torch.Tensor], dict[str, Any]]:
    """Trains one config; returns per-step losses, final model entries (by global expert) and the summary."""
    dcfg = compose_dict(["experiment=debug", *COMMON, *overrides])
    summary = train(to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True), run_dir)  # type: ignore[arg-type]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    summary["dropped_total"] = sum(r["dropped_frac"] for r in records if "loss" in r)
    entries = read_entries(run_dir / "checkpoints" / f"step_{STEPS:08d}")
    return losses, {k: v for k, v in entries.items() if k.startswith("model/")}, summary


CASES = [  # (name, overrides, processes, routing groups: processes x micro-batches)
    ("data_parallel", ["parallel=data_parallel", "parallel.num_actors=2"], 2, 2),
    ("expert_parallel", ["parallel=expert_parallel", "parallel.num_actors=2"], 2, 2),
    ("expert_parallel_chunks", ["parallel=expert_parallel", "parallel.num_actors=2", "parallel.a2a_chunks=2"], 2, 2),
    ("expert_parallel_2mb", ["parallel=expert_parallel", "parallel.num_actors=2", "parallel.micro_batches=2"], 2, 4),
    ("expert_parallel_ep2_of_4", ["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2"], 4, 4),
]
MODES = [("dropless", "moe.capacity_factor=null"), ("capacity", "moe.capacity_factor=1.0")]
DISAGGREGATED = [  # (coordinators, micro-batches): the reference uses coordinators x micro-batches groups
    (1, 1), (1, 4), (2, 1), (2, 4),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,mode_override", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("name,overrides,ranks,groups", CASES, ids=[c[0] for c in CASES])
def test_strategy_matches_single(ray_cluster: object, tmp_path: Path, name: str, overrides: list[str], ranks: int,
                                 groups: int, mode: str, mode_override: str) -> None:
    ref_losses, ref_params, _ = run(tmp_path / "single", mode_override, f"moe.routing_groups={groups}")
    losses, params, summary = run(tmp_path / name, mode_override, *overrides)
    assert summary["processes"] == ranks
    assert sorted(losses) == list(range(1, STEPS + 1))
    for step, ref in ref_losses.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), f"step {step}"
    assert ref_losses[STEPS] < ref_losses[1]  # it trained
    assert (summary["dropped_total"] > 0) == (mode == "capacity")  # capacity mode really drops
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(params[key], ref, atol=1e-4, rtol=0, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("mode,mode_override", MODES, ids=[m[0] for m in MODES])
@pytest.mark.parametrize("coordinators,micro", DISAGGREGATED, ids=[f"{c}coord_{m}mb" for c, m in DISAGGREGATED])
def test_disaggregated_matches_single(ray_cluster: object, tmp_path: Path, coordinators: int, micro: int,
                                      mode: str, mode_override: str) -> None:
    ref_losses, ref_params, _ = run(tmp_path / "single", mode_override, f"moe.routing_groups={coordinators * micro}")
    losses, params, summary = run(tmp_path / "disaggregated", mode_override, "parallel=disaggregated",
                                  f"parallel.num_coordinators={coordinators}", "parallel.num_expert_actors=2",
                                  f"parallel.micro_batches={micro}")
    assert summary["roles"] == ["coordinator"] * coordinators + ["experts"] * 2
    for step, ref in ref_losses.items():
        assert losses[step] == pytest.approx(ref, rel=1e-5), f"step {step}"
    assert (summary["dropped_total"] > 0) == (mode == "capacity")
    assert params.keys() == ref_params.keys()
    for key, ref in ref_params.items():
        torch.testing.assert_close(params[key], ref, atol=1e-4, rtol=0, msg=key)
