"""Load-balance metrics: skewed routing shows, balanced routing does not; counts add across ranks."""

from __future__ import annotations

import pytest
import torch

from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.layer import MoELayer
from moe_trainer.train.aggregate import add_expert_role, aggregate_chunk
from moe_trainer.train.metrics import LoadCounts, balance_metrics


def layer_metrics(cfg: MoEConfig, force_expert: int | None, tokens: int = 64) -> dict:
    torch.manual_seed(0)
    layer = MoELayer(16, cfg)
    if force_expert is not None:
        layer.router.expert_bias[force_expert] = 100.0  # selection-only bias: everyone picks it first
    _, stats = layer(torch.randn(1, tokens, 16))
    return balance_metrics(LoadCounts.from_stats([stats], cfg.num_experts))


def test_skewed_routing_shows_in_imbalance_and_drops() -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, router="switch", capacity_factor=1.0, bias_balancing=True)
    m = layer_metrics(cfg, force_expert=2)
    assert m["layers"][0]["tokens_per_expert"] == [0, 0, 64, 0]
    assert m["load_imbalance"] == pytest.approx(4.0)  # max/mean with everything on one of 4 experts
    assert m["dropped_frac"] == pytest.approx((64 - 16) / 64)  # capacity ceil(1.0 * 64 / 4) = 16 kept


def test_balanced_routing_has_max_mean_near_one_and_no_drops() -> None:
    m = layer_metrics(MoEConfig(num_experts=4, top_k=2, router="expert_choice", capacity_factor=1.0), None)
    assert m["load_imbalance"] == pytest.approx(1.0)
    assert m["load_cv"] == pytest.approx(0.0)
    assert m["dropped_frac"] == 0.0


def test_counts_sum_before_ratios() -> None:
    a = LoadCounts(torch.tensor([[4.0, 0.0]]), torch.tensor([0.0]), torch.tensor([4.0]), torch.tensor([0.5]), 1)
    b = LoadCounts(torch.tensor([[0.0, 4.0]]), torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([0.7]), 1)
    total = LoadCounts.total([a, b])
    m = balance_metrics(total)
    assert m["load_imbalance"] == pytest.approx(1.0)  # each rank skewed, the global batch balanced
    assert m["dropped_frac"] == pytest.approx(2 / 8)
    assert m["router_entropy"] == pytest.approx(0.6)


def test_aggregation_reports_mean_max_and_slowest_rank() -> None:
    ranks = [[{"step": 1, "loss": 2.0, "tokens_step": 100, "step_time_s": t, "a2a_time_s": t / 2}] for t in (1.0, 3.0)]
    (record,) = aggregate_chunk(ranks)
    assert record["step_time_s"] == 2.0 and record["step_time_s_max"] == 3.0 and record["step_time_s_argmax"] == 1
    assert record["tokens_per_s"] == pytest.approx(100 / 3.0)  # the step ends with the slowest rank
    assert record["comm_share"] == pytest.approx(1.0 / 2.0)


def test_aggregation_joins_every_ranks_timeline_and_the_expert_actors() -> None:
    def rank(pid: int, **extra: object) -> dict:
        return {"step": 2, "loss": 2.0, "tokens_step": 100, "step_time_s": 1.0, "a2a_time_s": 0.5, **extra,
                "timeline": [{"name": "forward", "ph": "X", "pid": pid}]}

    (record,) = aggregate_chunk([[rank(0)], [rank(1)]])
    assert [e["pid"] for e in record["timeline"]] == [0, 1]  # not rank 0's list alone
    expert = {key: 0.1 for key in ("expert_busy_s", "expert_wait_s", "expert_step_time_s", "expert_rows_recv",
                                   "expert_mem_rss_mb", "expert_mem_peak_rss_mb", "expert_mem_optim_state_mb")}
    add_expert_role([record], [[{**expert, "timeline": [{"name": "experts", "ph": "X", "pid": 2}]}], [expert]])
    assert [e["pid"] for e in record["timeline"]] == [0, 1, 2]
    (unsampled,) = aggregate_chunk([[{**rank(0), "timeline": None}], [{"step": 2, **rank(1)}]])
    assert [e["pid"] for e in unsampled["timeline"]] == [1]
    (plain,) = aggregate_chunk([[{"step": 1, "loss": 2.0, "tokens_step": 100, "step_time_s": 1.0}]])
    assert "timeline" not in plain
