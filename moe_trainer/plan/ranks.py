"""Who holds what: every rank's parameters and the tokens it runs, without allocating a model.

A rank's parameters come from the model code itself, built on the ``meta`` device (shapes,
no storage), so the plan cannot drift from what the ranks build: the same
:class:`~moe_trainer.model.transformer.Transformer` with the rank's expert range (single, data and expert
parallel, disaggregated coordinators) or the expert actor's
:class:`~moe_trainer.parallel.disaggregated.ExpertShardModel`. Ranks that hold the same shapes
are one :class:`RankShape` (every data-parallel rank; expert-parallel ranks all hold ``E /
ep_size`` experts), listed with their ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_trainer.config.schema import Config, experts_per_token
from moe_trainer.config.validate import data_parallel_ranks, micro_batches, sequences_per_forward
from moe_trainer.model.transformer import Transformer
from moe_trainer.moe.experts import is_expert_param
from moe_trainer.parallel.topology import Topology, ep_size, world_size


@dataclass(frozen=True)
class ParamTensor:
    """One parameter a rank holds: its name in the rank's model and its element count."""

    name: str
    numel: int

    @property
    def expert(self) -> bool:
        return is_expert_param(self.name)


@dataclass(frozen=True)
class RankShape:
    """A set of ranks that hold the same tensors and run the same number of tokens."""

    role: str  # single | actor | coordinator | expert actor
    ranks: tuple[int, ...]  # global ranks
    experts: tuple[tuple[int, int], ...]  # per rank: (first global expert, count) it holds
    params: tuple[ParamTensor, ...]  # every parameter of one of these ranks
    buffer_bytes: int  # non-parameter tensors of the model (rotary tables, router biases)
    tokens: int  # tokens of one forward (trainer ranks) or rows received per step (expert actors)
    micro_batches: int  # forwards kept at once per step: micro-batches (all kept until backward)
    replicas: int  # ranks holding the same experts (expert-data-parallel group size)
    dp_ranks: int  # data-parallel ranks that share the dense parameters
    ep_size: int  # ranks one MoE layer's experts are spread over (1: no all-to-all)

    @property
    def dense_numel(self) -> int:
        return sum(p.numel for p in self.params if not p.expert)

    @property
    def expert_numel(self) -> int:
        return sum(p.numel for p in self.params if p.expert)

    @property
    def local_experts(self) -> int:
        return self.experts[0][1]


def planned_vocab_size(cfg: Config) -> int:
    """The embedding's rows: the tokenizer's vocabulary (byte: 256 + end-of-document)."""
    if cfg.data.tokenizer == "byte":
        return 257
    size = getattr(cfg.data, "vocab_size", None)  # a trained BPE's target size, where the schema has one
    if size:
        return int(size)
    from moe_trainer.data import build_tokenizer  # here: it imports `datasets`

    return build_tokenizer(cfg.data.tokenizer).vocab_size


def _meta(model: nn.Module) -> tuple[tuple[ParamTensor, ...], int]:
    """The parameters and buffer bytes of a model built on the meta device."""
    params = tuple(ParamTensor(n, p.numel()) for n, p in model.named_parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, buffers


def trainer_params(cfg: Config, vocab: int, expert_range: tuple[int, int]) -> tuple[tuple[ParamTensor, ...], int]:
    """Parameters and buffer bytes of a rank that runs the blocks and holds experts ``expert_range``."""
    # engine.build_model's own call: the engine module imports the data pipeline (`datasets`),
    # which the torch-only GPU check lacks and the plan does not need
    with torch.device("meta"):
        return _meta(Transformer(cfg.model, cfg.moe, vocab, cfg.train.seed, expert_range=expert_range,
                                 recompute=cfg.train.recompute))


def expert_actor_params(cfg: Config, expert_range: tuple[int, int]) -> tuple[tuple[ParamTensor, ...], int]:
    from moe_trainer.parallel.disaggregated import ExpertShardModel

    with torch.device("meta"):
        return _meta(ExpertShardModel(cfg, expert_range))


def rank_shapes(cfg: Config) -> list[RankShape]:
    """The distinct ranks of ``cfg``'s layout, in rank order (validation has passed)."""
    vocab = planned_vocab_size(cfg)
    tokens = sequences_per_forward(cfg) * cfg.data.seq_len
    mb = micro_batches(cfg)
    dp = data_parallel_ranks(cfg)
    p = cfg.parallel
    if p.strategy == "disaggregated":
        coordinators = tuple(range(p.num_coordinators))
        params, buffers = trainer_params(cfg, vocab, (0, 0))
        per_actor = cfg.moe.num_experts // p.num_expert_actors
        actors = tuple(range(p.num_coordinators, world_size(cfg)))
        expert_params, expert_buffers = expert_actor_params(cfg, (0, per_actor))
        k = experts_per_token(cfg.moe)
        rows = tokens * k * p.num_coordinators // p.num_expert_actors  # every coordinator's rows, balanced
        return [
            RankShape("coordinator", coordinators, tuple((0, 0) for _ in coordinators), params, buffers, tokens, mb,
                      1, dp, 1),
            RankShape("expert actor", actors, tuple(((r - p.num_coordinators) * per_actor, per_actor) for r in actors),
                      expert_params, expert_buffers, rows, p.num_coordinators * mb, 1, dp, p.num_expert_actors),
        ]
    world = world_size(cfg)
    ep = ep_size(cfg)
    topologies = [Topology(rank, world, ep, cfg.moe.num_experts) for rank in range(world)]
    params, buffers = trainer_params(cfg, vocab, (0, cfg.moe.num_experts // ep))
    role = "single" if p.strategy == "single" else "actor"
    experts = tuple(t.expert_range if cfg.model.arch == "moe" else (0, 0) for t in topologies)
    return [RankShape(role, tuple(range(world)), experts, params, buffers, tokens, mb, world // ep, dp, ep)]
