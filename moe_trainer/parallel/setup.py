"""Builds one rank of a Ray strategy: process groups, this rank's share of the model, its runner.

Called inside each Ray actor (see ``actors/``), but has no Ray in it: the same
functions run under any launcher that gives a rank and a rendezvous address.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed

from moe_trainer.config.schema import Config
from moe_trainer.data import build_batch_source
from moe_trainer.device import configure_process
from moe_trainer.engine import build_model
from moe_trainer.moe.dispatcher import Dispatcher, LocalTransport, Transport
from moe_trainer.moe.experts import is_expert_param
from moe_trainer.parallel.async_a2a import AsyncAllToAllTransport
from moe_trainer.parallel.comm import init_process_group, new_group
from moe_trainer.parallel.context import DistributedContext, Groups
from moe_trainer.parallel.disaggregated import ExpertActorsTransport, ExpertServer, Roles
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.overlap import ChunkedAllToAllTransport
from moe_trainer.parallel.p2p import Lanes
from moe_trainer.parallel.resources import rank_resources
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.parallel.topology import Topology, ep_size, shard_ranks, world_size
from moe_trainer.parallel.zero import OptimizerShards
from moe_trainer.train.trainer import Trainer


def roles(cfg: Config) -> Roles:
    return Roles(cfg.parallel.num_coordinators, cfg.parallel.num_expert_actors, cfg.moe.num_experts)


@dataclass
class RankSetup:
    runner: Trainer | ExpertServer  # what this rank runs: a trainer, or an expert server
    role: str  # "trainer" (data/expert parallel), "coordinator" or "experts"
    backend: str
    expert_range: tuple[int, int]
    save_dense: bool  # this rank writes the dense checkpoint entries
    save_experts: bool  # this rank writes its experts' checkpoint entries
    # parallel.shard_optimizer: the parameters whose optimizer entries this rank writes (and alone holds);
    # None: optimizer entries follow save_dense / save_experts
    optim_owner: Callable[[str], bool] | None = None
    checkpoint_group: Any = None  # every rank, gloo: checkpoint saves (set by build_rank)
    control_group: Any = None  # every rank, gloo: the per-step stop agreement of a preemption (set by build_rank)


def _device(cfg: Config, rank: int) -> tuple[str, torch.device]:
    """One GPU per rank with NCCL (Ray gives the actor exactly one: validation allows only 0 or 1), else gloo.

    Asked per rank, since disaggregated roles are sized apart; validation makes every rank
    agree (one process group, one backend).
    """
    if rank_resources(cfg, rank)[1] > 0:
        return "nccl", torch.device("cuda", torch.cuda.current_device())
    return "gloo", torch.device("cpu")


def _groups_containing(rank: int, layouts: list[list[int]], timeout: float) -> Any:
    """Creates every group of ``layouts`` (all ranks must, in the same order); returns ``rank``'s."""
    mine = None
    for ranks in layouts:
        group = new_group(ranks, timeout)
        mine = group if rank in ranks else mine
    return mine


def expert_parallel_transport(cfg: Config, topo: Topology, ep_group: Any, counters: CommCounters) -> Transport:
    """How rows travel in an expert-parallel group: the one choice of transport for data/expert parallel ranks."""
    args = (ep_group, topo.ep_size, topo.ep_rank, cfg.moe.num_experts)
    if topo.ep_size == 1:
        return LocalTransport()
    if cfg.parallel.micro_batches > 1:
        return AsyncAllToAllTransport(*args, counters=counters)
    if cfg.parallel.a2a_chunks > 1:
        return ChunkedAllToAllTransport(*args, cfg.parallel.a2a_chunks, counters=counters)
    return AllToAllTransport(*args, counters=counters)


# ranks holding the same copy of a set of parameters, and their process group (None: the world)
ShardGroup = tuple[Sequence[int], Any]


def _trainer(cfg: Config, dispatcher: Dispatcher, expert_range: tuple[int, int], ctx: DistributedContext,
             device: torch.device, rank: int, shard_over: tuple[ShardGroup, ShardGroup]) -> Trainer:
    """This rank's Trainer; with ``parallel.shard_optimizer`` its optimizer state is sharded over
    ``shard_over`` (dense parameters' ranks, experts' ranks)."""
    torch.manual_seed(cfg.train.seed)
    data = build_batch_source(cfg.data, cfg.train.batch_size, cfg.train.seed)  # loads the run's tokenizer file
    model = build_model(cfg, data.vocab_size, dispatcher=dispatcher, expert_range=expert_range).to(device)
    shards = OptimizerShards.for_model(model, rank, *shard_over) if cfg.parallel.shard_optimizer else None
    return Trainer(cfg, model, data, ctx, shards)


def _owner(trainer: Trainer) -> Callable[[str], bool] | None:
    return trainer.shards.owns if trainer.shards is not None else None


def build_rank(cfg: Config, rank: int, master_addr: str, master_port: int) -> RankSetup:
    """Joins the process group as ``rank`` and builds what this rank runs."""
    backend, device = _device(cfg, rank)
    configure_process(device)
    timeout = cfg.parallel.timeout_s
    init_process_group(backend, master_addr, master_port, rank, world_size(cfg), timeout)
    # its own group, first on every rank: a background save coordinates in a thread of its own while training's
    # collectives run, and DCP's asynchronous save needs a CPU backend whatever the world's is
    checkpoint_group = new_group(list(range(world_size(cfg))), timeout, backend="gloo")
    # and one for the stop flag every rank checks after every step, which must not queue behind a save
    control_group = new_group(list(range(world_size(cfg))), timeout, backend="gloo")
    if cfg.parallel.strategy == "disaggregated":
        setup = _build_disaggregated(cfg, rank, backend, device)
    else:
        setup = _build_parallel(cfg, rank, backend, device)
    return replace(setup, checkpoint_group=checkpoint_group, control_group=control_group)


def _build_parallel(cfg: Config, rank: int, backend: str, device: torch.device) -> RankSetup:
    """A data- or expert-parallel rank: its expert-parallel and expert-data-parallel groups, its Trainer."""
    timeout = cfg.parallel.timeout_s
    topo = Topology(rank=rank, world=world_size(cfg), ep_size=ep_size(cfg), num_experts=cfg.moe.num_experts)
    ep_group = _groups_containing(rank, topo.ep_groups(), timeout)
    edp_group = _groups_containing(rank, topo.edp_groups(), timeout)
    counters = CommCounters()
    dispatcher = Dispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor,
                            expert_parallel_transport(cfg, topo, ep_group, counters))
    groups = Groups(data=None, expert_replicas=edp_group, replicas=topo.world // topo.ep_size,
                    norm=ep_group if topo.ep_size > 1 else None, counts_dense_norm=topo.ep_rank == 0)
    ctx = DistributedContext(rank, topo.world, groups, counters, device)
    dense_ranks, expert_ranks = shard_ranks(cfg, rank)
    shard_over = ((dense_ranks, None), (expert_ranks, edp_group))
    trainer = _trainer(cfg, dispatcher, topo.expert_range, ctx, device, rank, shard_over)
    return RankSetup(trainer, "trainer", backend, topo.expert_range, save_dense=rank == 0,
                     save_experts=rank < topo.ep_size, optim_owner=_owner(trainer))


def _build_disaggregated(cfg: Config, rank: int, backend: str, device: torch.device) -> RankSetup:
    r = roles(cfg)
    world = torch.distributed.group.WORLD
    coordinators = _groups_containing(rank, [list(range(r.num_coordinators))], cfg.parallel.timeout_s)
    everyone = list(range(r.world))
    lanes = Lanes(*(new_group(everyone, cfg.parallel.timeout_s) for _ in ("requests", "replies")))
    if not r.is_coordinator(rank):
        server = ExpertServer(cfg, rank, r, device, world, lanes)
        return RankSetup(server, "experts", backend, r.expert_range(rank), save_dense=False, save_experts=True)
    counters = CommCounters()
    dispatcher = Dispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor, ExpertActorsTransport(r, lanes, counters))
    groups = Groups(data=coordinators, expert_replicas=None, replicas=1, norm=world, counts_dense_norm=rank == 0)
    ctx = DistributedContext(rank, r.num_coordinators, groups, counters, device)
    # expert actors hold the only copy of their experts: only the coordinators' dense state is shared out
    dense_ranks, expert_ranks = shard_ranks(cfg, rank)
    shard_over = ((dense_ranks, coordinators), (expert_ranks, None))
    trainer = _trainer(cfg, dispatcher, r.expert_range(rank), ctx, device, rank, shard_over)
    return RankSetup(trainer, "coordinator", backend, r.expert_range(rank), save_dense=rank == 0,
                     save_experts=False, optim_owner=_owner(trainer))


def local_parameter_counts(model: torch.nn.Module) -> dict[str, Any]:
    """Parameters this rank actually holds (experts: only its shard)."""
    expert = sum(p.numel() for n, p in model.named_parameters() if is_expert_param(n))
    total = sum(p.numel() for p in model.parameters())
    return {"params_local": total, "expert_params_local": expert, "dense_params_local": total - expert}
