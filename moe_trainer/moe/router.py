"""Router: scores tokens, picks experts, returns gate weights and auxiliary losses.

Single-device math only; it never communicates. Routing math runs in fp32
whatever the activation dtype, because small logit differences decide which
expert a token goes to.

Shape legend: T tokens, D model width, E experts, K experts per token,
G routing groups, A assignments (token-expert pairs, ``T * K`` for token choice).

Routing groups: capacities (and expert choice) are computed per group of ``T / G``
consecutive tokens, a fixed number of whole sequences (``moe.group_sequences``), so
every layout cuts the global batch into the same groups. The load-balancing loss is
either per group (``moe.aux_loss_scope=group``, GShard) or over the whole global
batch (``global``, formed by the trainer from every rank's counts with
:func:`global_load_balancing_loss`); see docs/architecture.md, "Routing groups".
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_trainer.config.schema import MoEConfig, experts_per_token
from moe_trainer.moe.routing_noise import uniform_noise


@dataclass(frozen=True)
class Routing:
    """What the router decided, as a flat list of assignments in priority order.

    Assignment order matters for capacity: when an expert is full, the later
    assignments are dropped. Token choice lists all first choices, then all
    second choices (GShard's priority of top-1 over top-2), each in token order.
    """

    token_idx_A: Tensor  # int64 [A]: the token of each assignment
    expert_idx_A: Tensor  # int64 [A]: the (global) expert of each assignment
    weight_A: Tensor  # fp32 [A]: gate weight applied to the expert's output
    aux_loss: Tensor  # fp32 scalar: per-group load-balancing loss, mean over groups (0 when scope is global)
    z_loss: Tensor  # fp32 scalar: router z-loss, mean over tokens
    probs_TE: Tensor  # fp32 [T, E]: softmax over all experts (for entropy metrics)
    tokens_per_expert_E: Tensor  # int64 [E]: assignments per expert before any drop
    drops_allowed: bool  # False when the router already enforced capacity (expert choice)


def load_balancing_loss(probs_GTE: Tensor, expert_idx_GTK: Tensor, num_experts: int) -> Tensor:
    """Switch/GShard load-balancing loss ``E * sum_i f_i * P_i``, averaged over groups.

    ``f_i`` is the fraction of the group's assignments routed to expert ``i`` (not
    differentiable), ``P_i`` the mean router probability of expert ``i``. It equals 1
    under perfectly uniform routing and grows as routing collapses onto few experts.
    Fedus et al., Switch Transformers, https://arxiv.org/abs/2101.03961 (eq. 4).
    """
    groups, tokens, k = expert_idx_GTK.shape
    idx_GA = expert_idx_GTK.reshape(groups, -1)
    counts_GE = probs_GTE.new_zeros(groups, num_experts).scatter_add_(1, idx_GA, probs_GTE.new_ones(idx_GA.shape))
    f_GE = counts_GE / (tokens * k)
    p_GE = probs_GTE.mean(dim=1)
    return (num_experts * (f_GE * p_GE).sum(dim=-1)).mean()


def global_load_balancing_loss(mean_probs_LE: Tensor, tokens_per_expert_LE: Tensor) -> Tensor:
    """Global-batch load-balancing loss ``E * sum_i f_i * P_i``, averaged over MoE layers.

    ``f_i`` is counted over the *whole global batch* (``tokens_per_expert_LE`` summed over
    micro-batches and data-parallel ranks; no gradient), ``P_i`` is this rank's mean router
    probability (``mean_probs_LE``, differentiable). Every rank adds its own term to its
    loss; averaged over ranks, as the gradients are, the terms give ``E * sum_i f_i * P_i``
    of the global batch, value and gradient, whatever the layout. Balancing the global batch
    rather than each micro-batch also lets experts specialise by domain (Qiu et al.,
    "Demons in the Detail", https://arxiv.org/abs/2501.11873; Megatron-Core's global aux loss).
    """
    num_experts = mean_probs_LE.shape[-1]
    counts_LE = tokens_per_expert_LE.to(mean_probs_LE)
    f_LE = counts_LE / counts_LE.sum(dim=-1, keepdim=True).clamp_min(1.0)
    return (num_experts * (f_LE * mean_probs_LE).sum(dim=-1)).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_t (logsumexp_i x_ti)^2``: keeps logits small and stable.

    Zoph et al., ST-MoE, https://arxiv.org/abs/2202.08906 (eq. 5).
    """
    return torch.logsumexp(logits_TE, dim=-1).square().mean()


def is_router_param(name: str) -> bool:
    """Whether parameter ``name`` (as ``named_parameters`` gives it) is a router's weight.

    Every MoE layer holds its router in a submodule named ``router`` (:class:`Router`), whose one
    parameter is ``weight``; ``train.router_lr_scale`` gives it a learning rate of its own.
    """
    return name.endswith(".router.weight") or name == "router.weight"


def count_per_expert(expert_idx_A: Tensor, num_experts: int) -> Tensor:
    """int64 ``[E]``: how many of ``expert_idx_A`` name each expert.

    A scatter-add into ``E`` zeros rather than ``torch.bincount``, whose output length
    depends on the largest index: on CUDA that costs a device-to-host read per call.
    """
    counts_E = torch.zeros(num_experts, dtype=torch.int64, device=expert_idx_A.device)
    return counts_E.scatter_add_(0, expert_idx_A, torch.ones_like(expert_idx_A))


def capacity(tokens_per_group: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Slots per expert per routing group: ``ceil(cf * tokens * k / E)`` (GShard)."""
    return max(1, math.ceil(capacity_factor * tokens_per_group * top_k / num_experts))


class Router(nn.Module):
    """Token-choice top-k (two score orders), Switch top-1, or expert-choice routing.

    - ``topk`` + ``softmax_topk``: softmax over all E logits, then top-k, optional
      renormalisation of the k weights (GShard, DeepSeek).
    - ``topk`` + ``topk_softmax``: top-k logits, then softmax over those k (Mixtral).
    - ``switch``: top-1 of the softmax, weight = probability (Switch Transformer).
    - ``expert_choice``: each expert takes its top-``capacity`` tokens of the group
      (Zhou et al., https://arxiv.org/abs/2202.09368); balanced by construction.

    With ``bias_balancing`` a per-expert bias is added to the scores used for
    *selection* only (never to the gate weights) and nudged after each step towards
    uniform load: DeepSeek-V3's aux-loss-free balancing (https://arxiv.org/abs/2412.19437, sec. 2.1.2).
    With ``selection_noise`` (token choice, training only) noise is added to those selection scores
    too, hashed per token so that every layout draws the same (:mod:`moe_trainer.moe.routing_noise`).
    """

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = experts_per_token(cfg)
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_TD: Tensor, num_groups: int = 1, noise_keys_T: Tensor | None = None,
                layer: int = 0) -> Routing:
        """Routes ``x_TD``. ``noise_keys_T``: each token's key for ``moe.selection_noise`` in training
        (:func:`~moe_trainer.moe.routing_noise.routing_keys`; required when the noise is on);
        ``layer`` salts the noise so that layers draw their own."""
        tokens = x_TD.shape[0]
        if tokens % num_groups:
            raise ValueError(f"{tokens} tokens do not split into {num_groups} routing groups")
        # autocast off: it would run the logits' matmul (and on CPU logsumexp) in bf16
        with torch.autocast(x_TD.device.type, enabled=False):
            return self._route(x_TD.float(), num_groups, noise_keys_T, layer)

    def _selection_noise(self, noise_keys_T: Tensor | None, layer: int) -> Tensor | None:
        """``[T, E]`` noise of standard deviation ``moe.selection_noise`` for selection, or None."""
        if not (self.training and self.cfg.selection_noise > 0):
            return None
        if noise_keys_T is None:  # a local stand-in (the token's index here) would differ between layouts
            raise ValueError("moe.selection_noise needs each token's routing key in training: route through "
                             "Transformer.forward or run_microbatches, or pass noise_keys_T (routing_keys)")
        return uniform_noise(noise_keys_T, layer, self.num_experts) * (self.cfg.selection_noise * math.sqrt(12.0))

    def _route(self, x_TD: Tensor, num_groups: int, noise_keys_T: Tensor | None = None, layer: int = 0) -> Routing:
        tokens = x_TD.shape[0]
        logits_TE = F.linear(x_TD, self.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        z_loss = router_z_loss(logits_TE)
        if self.cfg.router == "expert_choice":
            return self._expert_choice(probs_TE, num_groups, z_loss)

        scores_TE = probs_TE if self.cfg.score_order == "softmax_topk" or self.cfg.router == "switch" else logits_TE
        select_TE = scores_TE + self.expert_bias if self.cfg.bias_balancing else scores_TE
        noise_TE = self._selection_noise(noise_keys_T, layer)
        if noise_TE is not None:
            select_TE = select_TE + noise_TE
        expert_idx_TK = select_TE.topk(self.top_k, dim=-1).indices
        if self.cfg.router == "topk" and self.cfg.score_order == "topk_softmax":
            weight_TK = logits_TE.gather(1, expert_idx_TK).softmax(dim=-1)
        else:
            weight_TK = probs_TE.gather(1, expert_idx_TK)
            if self.cfg.router == "topk" and self.cfg.normalize_topk:
                weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        weight_TK = weight_TK * self.cfg.routed_scale

        if self.cfg.aux_loss_scope == "group":
            aux_loss = load_balancing_loss(
                probs_TE.view(num_groups, -1, self.num_experts),
                expert_idx_TK.view(num_groups, -1, self.top_k),
                self.num_experts,
            )
        else:  # global: needs every rank's counts, formed by the trainer
            aux_loss = probs_TE.new_zeros(())
        # k-major flattening: every token's first choice outranks any second choice.
        token_idx_A = torch.arange(tokens, device=x_TD.device).repeat(self.top_k)
        expert_idx_A = expert_idx_TK.t().reshape(-1)
        return Routing(
            token_idx_A=token_idx_A,
            expert_idx_A=expert_idx_A,
            weight_A=weight_TK.t().reshape(-1),
            aux_loss=aux_loss,
            z_loss=z_loss,
            probs_TE=probs_TE,
            tokens_per_expert_E=count_per_expert(expert_idx_A, self.num_experts),
            drops_allowed=True,
        )

    def _expert_choice(self, probs_TE: Tensor, num_groups: int, z_loss: Tensor) -> Routing:
        tokens = probs_TE.shape[0]
        per_group = tokens // num_groups
        cf = self.cfg.capacity_factor if self.cfg.capacity_factor is not None else 1.0
        cap = min(per_group, capacity(per_group, self.cfg.top_k, self.num_experts, cf))
        scores_GET = probs_TE.view(num_groups, per_group, self.num_experts).transpose(1, 2)
        select_GET = scores_GET + self.expert_bias[:, None] if self.cfg.bias_balancing else scores_GET
        # a stable sort, not topk: tokens with equal scores (repeated tokens in equal contexts tie
        # exactly) go by position, so every layout picks the same ones (topk's tie order varies)
        local_idx_GEC = torch.sort(select_GET, dim=-1, descending=True, stable=True).indices[..., :cap]
        weight_GEC = scores_GET.gather(2, local_idx_GEC) * self.cfg.routed_scale
        offsets_G = torch.arange(num_groups, device=probs_TE.device) * per_group
        token_idx_GEC = local_idx_GEC + offsets_G[:, None, None]
        expert_idx_GEC = torch.arange(self.num_experts, device=probs_TE.device)[None, :, None].expand_as(
            token_idx_GEC)
        expert_idx_A = expert_idx_GEC.reshape(-1)
        return Routing(
            token_idx_A=token_idx_GEC.reshape(-1),
            expert_idx_A=expert_idx_A,
            weight_A=weight_GEC.reshape(-1),
            aux_loss=probs_TE.new_zeros(()),
            z_loss=z_loss,
            probs_TE=probs_TE,
            tokens_per_expert_E=count_per_expert(expert_idx_A, self.num_experts),
            drops_allowed=False,
        )

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: Tensor, rate_factor: float = 1.0) -> None:
        """DeepSeek-V3 bias step: raise the bias of under-loaded experts, lower over-loaded ones.

        ``tokens_per_expert_E`` must be the load of the whole global batch (summed over
        micro-batches and ranks) so every replica applies the same update; ``rate_factor``
        scales ``moe.bias_update_rate`` (``moe.bias_update_schedule``). ``sign`` moves every
        bias by the full rate each step, so near balance each one jitters by the rate around
        its target; ``proportional`` moves it by the rate times the expert's relative
        deviation, fast where an expert is far off and finely near balance. Its steps are lopsided:
        an idle expert rises by at most the rate, an overloaded one falls by up to ``E / k - 1``
        times it (7x at 64 experts, top-8), which is what pulls a hot expert back quickly.
        """
        if not self.cfg.bias_balancing:
            return
        load_E = tokens_per_expert_E.to(self.expert_bias)
        mean = load_E.mean()
        if self.cfg.bias_update == "proportional":
            step_E = torch.where(mean > 0, (mean - load_E) / mean, torch.zeros_like(load_E))  # no tokens: no step
        else:
            step_E = torch.sign(mean - load_E)
        self.expert_bias += (self.cfg.bias_update_rate * rate_factor) * step_E
