"""Disaggregated ranks built exactly as the actors build them, run as Ray tasks: skew, placement, bad input."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import ray

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config
from moe_trainer.config.validate import validate


@ray.remote(num_cpus=0.5, max_calls=1)  # a fresh process per rank: process groups are per process
def rank_main(cfg: Config, rank: int, port: int, steps: int, force_expert: int | None) -> dict[str, Any]:
    from moe_trainer.parallel.setup import build_rank

    setup = build_rank(cfg, rank, "127.0.0.1", port)
    runner = setup.runner
    if setup.role == "coordinator" and force_expert is not None:
        for layer in runner.model.moe_layers():  # selection-only bias: every token picks this expert first
            layer.router.expert_bias.fill_(0.0)
            layer.router.expert_bias[force_expert] = 100.0
    records = [runner.train_step() if setup.role == "experts" else runner.train_step().record
               for _ in range(steps)]
    # an evaluation pass after training: header-only messages to an expert actor that gets no rows, no backward
    val_loss = runner.evaluate(cfg.train.eval_batches) if setup.role == "experts" else runner.evaluate()
    names = [n for n, p in runner.model.named_parameters() if p.numel() > 0]
    return {"role": setup.role, "records": records, "names": names, "val_loss": val_loss}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(cfg: Config, steps: int = 2, force_expert: int | None = None) -> list[dict[str, Any]]:
    port = free_port()
    world = cfg.parallel.num_coordinators + cfg.parallel.num_expert_actors
    return ray.get([rank_main.remote(cfg, r, port, steps, force_expert) for r in range(world)], timeout=180)


def test_one_expert_actor_receiving_nothing_completes_and_each_role_holds_only_its_part(
        ray_cluster: object, make_config: Callable[..., Config]) -> None:
    cfg = make_config("parallel=disaggregated", "moe.router=switch", "moe.bias_balancing=true",
                      "moe.bias_update_rate=0", "parallel.micro_batches=2")
    results = run_ranks(cfg, force_expert=0)
    coordinator, first, second = results
    # experts 0,1 live on the first expert actor, 2,3 on the second: everything goes to expert 0
    # every token of both MoE blocks and both micro-batches: batch x seq_len x 2 rows per step
    rows = cfg.train.batch_size * cfg.data.seq_len * 2
    assert [r["expert_rows_recv"] for r in first["records"]] == [rows] * 2
    assert [r["expert_rows_recv"] for r in second["records"]] == [0, 0]
    assert [r["step"] for r in coordinator["records"]] == [1, 2]
    assert all(not r["step_skipped"] for r in coordinator["records"])  # both updates were applied
    assert coordinator["records"][-1]["load_imbalance"] == pytest.approx(4.0)  # all on one of 4 experts
    assert coordinator["val_loss"] > 0 and first["val_loss"] is second["val_loss"] is None  # evaluation completed
    # expert actors hold only experts (the idle one too), the coordinator none
    assert coordinator["role"] == "coordinator" and not any(".experts." in n for n in coordinator["names"])
    assert "embed.weight" in coordinator["names"] and any("router" in n for n in coordinator["names"])
    for actor in (first, second):
        assert actor["role"] == "experts"
        assert actor["names"] and all(".experts." in n for n in actor["names"])


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["moe.num_experts=5"], "moe.num_experts"),
        (["parallel.micro_batches=3"], "parallel.micro_batches"),
        (["parallel.num_expert_actors=0"], "parallel.num_expert_actors"),
        (["parallel.num_coordinators=3"], "train.batch_size"),
        (["model=dense"], "model.arch"),
    ],
)
def test_bad_disaggregated_settings(make_config: Callable[..., Config], overrides: list[str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config("parallel=disaggregated", *overrides))
    assert err.value.setting == setting
