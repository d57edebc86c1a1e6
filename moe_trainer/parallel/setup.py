"""Builds one rank of a data- or expert-parallel run: process groups, sharded model, trainer.

Called inside each Ray actor (see ``actors/``), but has no Ray in it: the same
function runs under ``torchrun`` or any launcher that gives a rank and a rendezvous.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from moe_trainer.config.schema import Config
from moe_trainer.data import build_batch_source, build_tokenizer
from moe_trainer.engine import build_model
from moe_trainer.moe.dispatcher import LocalDispatcher
from moe_trainer.moe.layer import Dispatcher
from moe_trainer.parallel.comm import init_process_group, new_group
from moe_trainer.parallel.context import DistributedContext
from moe_trainer.parallel.dispatcher import AllToAllDispatcher, CommCounters
from moe_trainer.parallel.topology import Topology
from moe_trainer.train.trainer import Trainer


def world_size(cfg: Config) -> int:
    return cfg.parallel.num_actors


def ep_size(cfg: Config) -> int:
    """Expert-parallel size: 1 for data_parallel, ``parallel.ep_size`` or all actors for expert_parallel."""
    if cfg.parallel.strategy == "expert_parallel":
        return cfg.parallel.ep_size if cfg.parallel.ep_size is not None else cfg.parallel.num_actors
    return 1


@dataclass
class RankSetup:
    trainer: Trainer
    topology: Topology
    backend: str


def build_rank(cfg: Config, rank: int, master_addr: str, master_port: int) -> RankSetup:
    """Joins the process group as ``rank`` and builds this rank's shard of the model and its trainer."""
    use_gpu = cfg.parallel.gpus_per_actor > 0
    backend = "nccl" if use_gpu else "gloo"
    device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
    topo = Topology(rank=rank, world=world_size(cfg), ep_size=ep_size(cfg), num_experts=cfg.moe.num_experts)
    timeout = cfg.parallel.timeout_s
    init_process_group(backend, master_addr, master_port, rank, topo.world, timeout)
    # every rank creates every group, in the same order (a torch.distributed requirement)
    ep_group = edp_group = None
    for ranks in topo.ep_groups():
        group = new_group(ranks, timeout)
        ep_group = group if rank in ranks else ep_group
    for ranks in topo.edp_groups():
        group = new_group(ranks, timeout)
        edp_group = group if rank in ranks else edp_group

    counters = CommCounters()
    dispatcher: Dispatcher
    if topo.ep_size > 1:
        dispatcher = AllToAllDispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor, ep_group, topo.ep_size,
                                        topo.ep_rank, counters)
    else:
        dispatcher = LocalDispatcher(cfg.moe.num_experts, cfg.moe.capacity_factor)
    torch.manual_seed(cfg.train.seed)
    vocab_size = build_tokenizer(cfg.data.tokenizer).vocab_size
    model = build_model(cfg, vocab_size, dispatcher=dispatcher, expert_range=topo.expert_range).to(device)
    data = build_batch_source(cfg.data, cfg.train.batch_size, cfg.train.seed)
    ctx = DistributedContext(topo, ep_group, edp_group, counters, device)
    return RankSetup(Trainer(cfg, model, data, ctx), topo, backend)


def local_parameter_counts(trainer: Trainer) -> dict[str, Any]:
    """Parameters this rank actually holds (experts: only its shard)."""
    expert = sum(p.numel() for n, p in trainer.model.named_parameters() if ".experts." in n)
    total = sum(p.numel() for p in trainer.model.parameters())
    return {"params_local": total, "expert_params_local": expert, "dense_params_local": total - expert}
