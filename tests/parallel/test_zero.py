"""ZeRO-1 ownership (:mod:`moe_trainer.parallel.zero`): who holds which optimizer state, without processes.

The equivalence of sharded runs with ``single`` (losses, every gradient, the final state) and
their checkpoints are tested on real Ray ranks in ``tests/actors/test_equivalence.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from moe_trainer.config.schema import Config, to_dataclass
from moe_trainer.engine import build_model
from moe_trainer.parallel.zero import OptimizerShards
from moe_trainer.parallel.zero_owners import assign_owners
from moe_trainer.train.optim import build_optimizer, clipped_step, optimizer_state_mb
from tests.conftest import compose_dict

VOCAB = 257


def test_owners_are_assigned_largest_first_to_the_least_loaded_rank() -> None:
    loads: dict[int, int] = {}
    owners = assign_owners({"a": 10, "b": 30, "c": 20, "d": 20, "e": 5}, [0, 1], loads)
    # b -> 0 (30); c -> 1 (20); d -> 1 (40, ties break by name: c before d); a -> 0 (40); e -> 0 (45, ties: lower rank)
    assert owners == {"b": 0, "c": 1, "d": 1, "a": 0, "e": 0}
    assert loads == {0: 45, 1: 40}
    seeded = assign_owners({"x": 8}, [0, 1], {0: 45, 1: 40})  # earlier domains' loads count
    assert seeded == {"x": 1}


def _shards(model: torch.nn.Module, rank: int, world: int, ep_size: int = 1) -> OptimizerShards:
    """Ownership as ``setup.build_rank`` plans it: dense over every rank, experts over the replicas."""
    replicas = list(range(rank % ep_size, world, ep_size))
    return OptimizerShards.for_model(model, rank, (range(world), None), (replicas, None))


def test_every_parameter_has_exactly_one_owner_and_ranks_agree(make_config: Callable[..., Config]) -> None:
    model = build_model(make_config(), VOCAB)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    plans = [_shards(model, rank, 4, ep_size=2) for rank in range(4)]
    dense = [n for n in names if ".experts." not in n]
    for name in dense:  # every rank computes the same dense owners
        assert len({p.owner[name] for p in plans}) == 1
        assert sum(p.owns(name) for p in plans) == 1
    for name in set(names) - set(dense):  # one owner per expert-data-parallel group {0, 2} and {1, 3}
        assert [plans[r].owns(name) for r in (0, 2)].count(True) == 1
        assert [plans[r].owns(name) for r in (1, 3)].count(True) == 1


def test_data_parallel_sends_one_bucket_per_owner(make_config: Callable[..., Config]) -> None:
    """Dense and expert domains have the same ranks: each owner broadcasts once per step, not once per domain."""
    shards = _shards(build_model(make_config(), VOCAB), 0, 2)
    assert [b.owner for b in shards.buckets] == [0, 1]
    assert sum(len(b.names) for b in shards.buckets) == len(shards.owner)


def test_dense_state_halves_on_the_default_model() -> None:
    """Largest-first over whole tensors: the largest rank's dense share at 2 ranks is within 0.1 % of half."""
    with torch.device("meta"):
        model = build_model(to_dataclass(compose_dict([])), VOCAB)
    sizes = {n: 2 * p.numel() * 4 for n, p in model.named_parameters() if ".experts." not in n}
    loads: dict[int, int] = {}
    assign_owners(sizes, [0, 1], loads)
    share = max(loads.values()) / sum(sizes.values())
    assert 0.5 <= share < 0.501, share


def test_a_sharded_optimizer_holds_and_updates_only_what_it_owns(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    model = build_model(cfg, VOCAB)
    shards = _shards(model, 1, 2)
    optimizer = build_optimizer(model, cfg.train, shards.owns)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clipped_step(optimizer, torch.tensor(10.0), 1.0)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) != shards.owns(name), name
    total, dense = optimizer_state_mb(optimizer, {id(p): n for n, p in model.named_parameters()})
    owned = sum(p.numel() for n, p in model.named_parameters() if shards.owns(n))
    assert total * 2**20 == 2 * 4 * owned + 4 * len(optimizer.state)  # two fp32 moments and a step counter each
    assert 0 < dense < total
    shards.after_step(model, applied=False)  # a skipped step broadcasts nothing; only the owned gradients stay
    assert all((p.grad is not None) == shards.owns(n) for n, p in model.named_parameters())


def test_a_rank_owning_nothing_steps_without_error(make_config: Callable[..., Config]) -> None:
    cfg = make_config()
    optimizer = build_optimizer(build_model(cfg, VOCAB), cfg.train, owns=lambda name: False)
    clipped_step(optimizer, torch.tensor(10.0), 1.0)
    assert not optimizer.state
