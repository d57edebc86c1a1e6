"""The plan's parameter, gradient and optimizer bytes are those of the modules each rank really builds."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from moe_trainer.config.schema import Config
from moe_trainer.engine import build_model
from moe_trainer.parallel.disaggregated import ExpertShardModel
from moe_trainer.parallel.topology import Topology, ep_size, shard_ranks, world_size
from moe_trainer.parallel.zero import OptimizerShards
from moe_trainer.plan.baseline import Baseline
from moe_trainer.plan.memory_plan import MemoryPlan, RankPlan, build_plan
from moe_trainer.train.optim import build_optimizer

NO_BASELINE = Baseline(rank=0, driver=0, logger=0, data_per_token=0.0)  # the model's bytes alone
LAYOUTS = {
    "single": ("parallel=single",),
    "data_parallel": ("parallel=data_parallel", "parallel.num_actors=2"),
    "expert_parallel": ("parallel=expert_parallel", "parallel.num_actors=2"),
    "expert_parallel ep=2 of 4": ("parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2",
                                  "train.batch_size=8"),
    "disaggregated": ("parallel=disaggregated", "parallel.num_expert_actors=2"),
}


def real_bytes(model: nn.Module, cfg: Config) -> tuple[int, int, int]:
    """Parameter (with buffers), gradient and AdamW state bytes after one real optimizer step."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(model, cfg.train)
    optimizer.step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    params += sum(b.numel() * b.element_size() for b in model.buffers())
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    moments = sum(s[k].numel() * s[k].element_size() for s in optimizer.state.values()
                  for k in ("exp_avg", "exp_avg_sq"))
    return params, grads, moments


def rank_model(cfg: Config, plan: RankPlan, rank: int) -> nn.Module:
    """What ``parallel.setup.build_rank`` builds on ``rank``: the model with its experts, or an expert shard."""
    experts = plan.experts[plan.ranks.index(rank)]
    if plan.role == "expert actor":
        return ExpertShardModel(cfg, experts)
    return build_model(cfg, 257, expert_range=experts)


def planned(cfg: Config) -> MemoryPlan:
    return build_plan(cfg, baseline=NO_BASELINE)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_parameters_gradients_and_moments_are_the_real_models(make_config: Callable[..., Config],
                                                              layout: str) -> None:
    cfg = make_config(*LAYOUTS[layout])
    plan = planned(cfg)
    world = 3 if layout == "disaggregated" else cfg.parallel.num_actors
    assert sorted(r for rank in plan.ranks for r in rank.ranks) == list(range(world))  # every rank planned
    for rank_plan in plan.ranks:
        for rank in rank_plan.ranks:
            params, grads, moments = real_bytes(rank_model(cfg, rank_plan, rank), cfg)
            assert (rank_plan.params, rank_plan.grads, rank_plan.optimizer) == (params, grads, moments), \
                f"{layout} rank {rank} ({rank_plan.role})"


def test_expert_parallel_ranks_hold_their_share_of_the_experts(make_config: Callable[..., Config]) -> None:
    one = planned(make_config("parallel=expert_parallel", "parallel.num_actors=1")).ranks[0]
    two = planned(make_config("parallel=expert_parallel", "parallel.num_actors=2"))
    assert [r.experts for r in two.ranks] == [((0, 2), (2, 2))]
    model = build_model(make_config(), 257)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert one.params - two.ranks[0].params == 4 * expert // 2  # half the experts' fp32 weights moved away


@pytest.mark.parametrize("layout", ["data_parallel", "expert_parallel ep=2 of 4"])
def test_a_sharded_optimizer_plans_the_share_each_rank_owns(make_config: Callable[..., Config], layout: str) -> None:
    """The plan's optimizer bytes per rank are those the ranks' own OptimizerShards hand out."""
    cfg = make_config(*LAYOUTS[layout])
    whole = sum(r.optimizer * len(r.ranks) for r in planned(cfg).ranks)
    cfg.parallel.shard_optimizer = True
    planned_bytes = {rank: r.optimizer for r in planned(cfg).ranks for rank in r.ranks}
    for rank, got in planned_bytes.items():
        topo = Topology(rank=rank, world=world_size(cfg), ep_size=ep_size(cfg), num_experts=cfg.moe.num_experts)
        model = build_model(cfg, 257, expert_range=topo.expert_range)  # this rank's model, as setup builds it
        dense, experts = shard_ranks(cfg, rank)
        assert got == OptimizerShards.for_model(model, rank, (dense, None), (experts, None)).loads[rank], rank
    assert max(planned_bytes.values()) < 0.6 * whole / len(planned_bytes)  # well under an unsharded rank


def test_recompute_lowers_the_activations_and_the_configured_mode_is_counted(
        make_config: Callable[..., Config]) -> None:
    none, block = (planned(make_config(f"train.recompute={m}")).ranks[0] for m in ("none", "block"))
    assert none.activations == block.activations  # every mode is reported, whichever runs
    assert none.activations["block"] < none.activations["attention"] < none.activations["none"]
    assert block.total < none.total


def test_a_sharded_optimizer_holds_each_moment_once_per_expert_parallel_group(
        make_config: Callable[..., Config]) -> None:
    """4 actors, ep_size 2: dense moments over all 4 ranks, each expert's over its 2 replicas."""
    cfg = make_config(*LAYOUTS["expert_parallel ep=2 of 4"])
    cfg.parallel.shard_optimizer = True  # type: ignore[attr-defined]
    ranks = [r for plan in planned(cfg).ranks for r in [plan] * len(plan.ranks)]
    model = build_model(cfg, 257)  # the whole model: every expert once
    dense = sum(p.numel() for n, p in model.named_parameters() if ".experts." not in n)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert sum(r.optimizer for r in ranks) == 8 * (dense + experts)
