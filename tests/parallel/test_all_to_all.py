"""The all-to-all dispatcher across real processes (Ray actors, a DeepSpeed gloo group) vs the local reference.

Includes the edge cases that hang naive implementations: every token routed to
one expert, and a rank that owns experts no token chose.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import torch

from moe_trainer.config.schema import MoEConfig
from moe_trainer.moe.layer import MoELayer

D, TOKENS = 8, 12


def make_layer(cfg: MoEConfig, expert_range: tuple[int, int] | None = None, dispatcher: Any = None) -> MoELayer:
    """Same weights for the full layer and any shard: experts drawn per global index."""
    layer = MoELayer(D, cfg, dispatcher=dispatcher, expert_range=expert_range).double()
    first, count = expert_range or (0, cfg.num_experts)
    gen = torch.Generator().manual_seed(0)
    full_up = torch.randn(cfg.num_experts, D, 2 * cfg.expert_hidden, generator=gen, dtype=torch.float64)
    full_down = torch.randn(cfg.num_experts, cfg.expert_hidden, D, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(cfg.num_experts, D, generator=gen, dtype=torch.float64))
        layer.experts.w_gate_up_EDF2.copy_(full_up[first:first + count])
        layer.experts.w_down_EFD.copy_(full_down[first:first + count])
    return layer


def inputs(world: int, skew: bool, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(world * TOKENS, D, generator=gen, dtype=torch.float64)
    if skew:  # a huge component along router row 0: every token's first choice is expert 0
        x = x + 50 * make_layer(MoEConfig(num_experts=num_experts, top_k=1, expert_hidden=4)).router.weight[0].detach()
    return x, torch.randn(world * TOKENS, D, generator=gen, dtype=torch.float64)


def rank_main(rank: int, world: int, cfg: MoEConfig, skew: bool, chunks: int = 1) -> dict[str, Any]:
    """One rank's share of a case, in a process that already joined the ``world``-rank group."""
    from moe_trainer.moe.dispatcher import Dispatcher
    from moe_trainer.parallel.async_a2a import AsyncAllToAllTransport
    from moe_trainer.parallel.comm import new_group
    from moe_trainer.parallel.dispatcher import AllToAllTransport
    from moe_trainer.parallel.overlap import ChunkedAllToAllTransport

    group = new_group(list(range(world)), 60)
    local = cfg.num_experts // world
    if chunks == 1:
        dispatcher = Dispatcher(cfg.num_experts, cfg.capacity_factor,
                                AllToAllTransport(group, world, rank, cfg.num_experts))
    elif chunks > 1:
        dispatcher = Dispatcher(cfg.num_experts, cfg.capacity_factor,
                                ChunkedAllToAllTransport(group, world, rank, cfg.num_experts, chunks))
    else:  # two micro-batches in lockstep, asynchronous all-to-alls (one routing group each)
        dispatcher = Dispatcher(cfg.num_experts, cfg.capacity_factor,
                                AsyncAllToAllTransport(group, world, rank, cfg.num_experts))
    layer = make_layer(cfg, (rank * local, local), dispatcher)
    x_all, g_all = inputs(world, skew, cfg.num_experts)
    x = x_all[rank * TOKENS:(rank + 1) * TOKENS].clone().requires_grad_(True)
    if chunks > 0:
        y, stats = layer(x[None], num_groups=1)
    else:
        pending = [layer.compute(layer.start(half[None], 1)) for half in x.chunk(2)]
        done = [layer.complete(p) for p in pending]
        y = torch.cat([d[0] for d in done], dim=1)
        stats = done[0][1]
    (y[0] * g_all[rank * TOKENS:(rank + 1) * TOKENS]).sum().backward()
    return {"y": y[0].detach(), "x_grad": x.grad, "router_grad": layer.router.weight.grad,
            "up_grad": layer.experts.w_gate_up_EDF2.grad, "counters": dispatcher.transport.counters.take(),
            "received": stats.tokens_per_expert_E}


@ray.remote(num_cpus=0.5)
class Rank:
    """A process of one gloo group, kept for the module: every case runs on fresh subgroups of it."""

    def __init__(self, rank: int, world: int, port: int) -> None:
        from moe_trainer.parallel.comm import init_process_group

        self.rank, self.world = rank, world
        init_process_group("gloo", "127.0.0.1", port, rank, world, timeout_s=60)

    def run(self, cfg: MoEConfig, skew: bool, chunks: int) -> dict[str, Any]:
        return rank_main(self.rank, self.world, cfg, skew, chunks)


WORLD = 2


@pytest.fixture(scope="module")
def ranks(ray_cluster: object) -> Iterator[list[Any]]:
    port = free_port()
    actors = [Rank.remote(r, WORLD, port) for r in range(WORLD)]
    yield actors
    for actor in actors:
        ray.kill(actor)


def run_case(ranks: list[Any], cfg: MoEConfig, skew: bool, chunks: int) -> list[dict[str, Any]]:
    return ray.get([rank.run.remote(cfg, skew, chunks) for rank in ranks], timeout=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("chunks", [1, 2, 3, 0], ids=["sync", "overlap2", "overlap3", "async_2microbatches"])
@pytest.mark.parametrize("skew", [False, True], ids=["random", "all_to_expert0"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "capacity"])
def test_all_to_all_dispatch_matches_local_reference(ranks: list[Any], skew: bool, capacity_factor: float | None,
                                                     chunks: int) -> None:
    """``chunks > 1``: the overlapped pipeline (3 chunks of 3 local experts: uneven, some chunks empty under skew).

    ``chunks == 0``: asynchronous all-to-alls with two micro-batches in lockstep; the reference
    then routes in one group per rank and micro-batch.
    """
    world = WORLD
    cfg = MoEConfig(num_experts=6, top_k=2, expert_hidden=4, capacity_factor=capacity_factor)
    results = run_case(ranks, cfg, skew, chunks)

    ref = make_layer(cfg)
    x_all, g_all = inputs(world, skew, cfg.num_experts)
    x_ref = x_all.clone().requires_grad_(True)
    groups = world if chunks > 0 else 2 * world
    y_ref, stats = ref(x_ref[None], num_groups=groups)
    (y_ref[0] * g_all).sum().backward()

    torch.testing.assert_close(torch.cat([r["y"] for r in results]), y_ref[0].detach())
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in results]), x_ref.grad)
    # router math runs in fp32 even for float64 layers: fp32 tolerance for its gradient
    torch.testing.assert_close(sum(r["router_grad"] for r in results), ref.router.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["up_grad"] for r in results]), ref.experts.w_gate_up_EDF2.grad)

    # what the routing implies: each group's kept assignments to experts owned by the other rank
    plan = ref.dispatcher.dispatch(x_all, ref.router(x_all, groups), num_groups=groups).plan
    expert_N = torch.repeat_interleave(torch.arange(cfg.num_experts), plan.tokens_per_expert_E)
    owner_N, source_N = expert_N // (cfg.num_experts // world), plan.token_idx_N // TOKENS
    for rank, r in enumerate(results):
        crossing = int(((source_N == rank) & (owner_N != rank)).sum())
        arriving = int(((source_N != rank) & (owner_N == rank)).sum())
        assert r["counters"]["a2a_dispatch_rows_sent"] == crossing
        assert r["counters"]["a2a_dispatch_rows_recv"] == arriving
        # forward both ways plus the gradients back both ways, float64 rows of width D
        assert r["counters"]["a2a_bytes_sent"] == 2 * (crossing + arriving) * D * 8
    sent = [r["counters"]["a2a_rows_sent"] for r in results]
    recv = [r["counters"]["a2a_rows_recv"] for r in results]
    assert sum(sent) == sum(recv)  # every row that leaves a rank arrives at another
    if skew:
        # experts 3-5 live on rank 1 and no token chose them first; with top-2 only second choices reach them
        assert stats.tokens_per_expert_E[0] == world * TOKENS
    else:
        assert min(sent) > 0  # tokens really crossed ranks


@pytest.mark.parametrize("chunks", [1, 2], ids=["sync", "overlap"])
def test_rank_owning_only_unchosen_experts_receives_nothing_and_does_not_hang(ranks: list[Any], chunks: int) -> None:
    cfg = MoEConfig(num_experts=4, top_k=1, expert_hidden=4, normalize_topk=False)
    results = run_case(ranks, cfg, True, chunks)
    # top-1 sends every token to expert 0 on rank 0; rank 1 owns experts 2 and 3 and gets no rows
    assert results[1]["counters"]["a2a_dispatch_rows_recv"] == 0
    assert results[1]["counters"]["a2a_dispatch_rows_sent"] == TOKENS
    assert results[0]["counters"]["a2a_dispatch_rows_recv"] == TOKENS
    assert results[0]["counters"]["a2a_combine_rows_sent"] == TOKENS
    assert torch.count_nonzero(results[1]["up_grad"]) == 0
