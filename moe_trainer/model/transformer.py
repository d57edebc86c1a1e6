"""Decoder-only transformer LM whose FFNs are MoE layers every ``moe.every`` blocks.

Initialisation is keyed by parameter name (and, for experts, by global expert
index), not by the order in which modules are built: a shard that holds experts
4..7 gets exactly the weights experts 4..7 have in the single-process model, which
is what lets every strategy start from the same point as the reference.

Shape legend: B batch, S sequence, D width, V vocabulary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from moe_trainer.config.schema import ModelConfig, MoEConfig, experts_per_token, is_moe_block
from moe_trainer.model.layers import Attention, RMSNorm, SwiGLU
from moe_trainer.model.recompute import recomputed
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.moe.layer import MoELayer, MoEStats
from moe_trainer.moe.router import Routing
from moe_trainer.moe.routing_noise import routing_keys


def active_ffn_hidden(moe_cfg: MoEConfig) -> int:
    """Hidden width of a dense FFN with the active parameters (and per-token FLOPs) of the MoE FFN it replaces.

    A token goes through its k routed experts, the shared experts and the router. The router's
    ``num_experts x d_model`` weights count as ``round(num_experts / 3)`` hidden units (a SwiGLU unit
    holds ``3 x d_model``): small beside wide experts, but a fifth of the FFN for 64 experts of 13 on
    a ``d_model`` of 32, which ``model=dense`` would otherwise undercut by 11% of the whole model.
    """
    top_k = experts_per_token(moe_cfg)
    routed = top_k * moe_cfg.expert_hidden + round(moe_cfg.num_experts / 3)
    return routed + moe_cfg.num_shared_experts * moe_cfg.shared_expert_hidden


class Block(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + ffn(norm(x))``.

    ``recompute`` (``train.recompute``) picks which local parts backward recomputes
    (:mod:`moe_trainer.model.recompute`); the math is the same in every mode.
    """

    def __init__(self, ffn: nn.Module, cfg: ModelConfig, recompute: str = "none") -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg.d_model, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = ffn
        self.recompute = recompute
        if isinstance(ffn, MoELayer):
            ffn.set_recompute(recompute == "block")

    def attend(self, x_BSD: Tensor) -> Tensor:
        if self.recompute == "attention":
            return recomputed(self._attend, x_BSD)
        return self._attend(x_BSD)

    def _attend(self, x_BSD: Tensor) -> Tensor:
        return x_BSD + self.attn(self.attn_norm(x_BSD))

    def before_dispatch(self, x_BSD: Tensor, num_groups: int, noise_keys_BS: Tensor | None = None
                        ) -> tuple[Tensor, Tensor, Routing]:
        """An MoE block up to its first all-to-all: ``(residual after attention, FFN input, routing)``.

        One communication-free region, recomputed as a whole with ``recompute=block``.
        ``noise_keys_BS``: the tokens' keys for ``moe.selection_noise`` (:meth:`Transformer.routing_keys`).
        """
        assert isinstance(self.ffn, MoELayer)
        if self.recompute == "block":
            return recomputed(self._before_dispatch, x_BSD, num_groups, noise_keys_BS, keep_decisions=True)
        return self._before_dispatch(x_BSD, num_groups, noise_keys_BS)

    def _before_dispatch(self, x_BSD: Tensor, num_groups: int, noise_keys_BS: Tensor | None
                         ) -> tuple[Tensor, Tensor, Routing]:
        x_BSD = self.attend(x_BSD)
        h_BSD = self.ffn_norm(x_BSD)
        return x_BSD, h_BSD, self.ffn.route(h_BSD, num_groups, noise_keys_BS)

    def forward(self, x_BSD: Tensor, num_groups: int, noise_keys_BS: Tensor | None = None
                ) -> tuple[Tensor, MoEStats | None]:
        if isinstance(self.ffn, MoELayer):
            x_BSD, h_BSD, routing = self.before_dispatch(x_BSD, num_groups, noise_keys_BS)
            y_BSD, stats = self.ffn.finish(self.ffn.start(h_BSD, num_groups, routing))
            return x_BSD + y_BSD, stats
        if self.recompute == "block":  # a dense block has no communication: recomputed whole
            return recomputed(self._dense, x_BSD), None
        return self._dense(x_BSD), None

    def _dense(self, x_BSD: Tensor) -> Tensor:
        x_BSD = self.attend(x_BSD)
        return x_BSD + self.ffn(self.ffn_norm(x_BSD))


@dataclass
class ModelOutput:
    logits_BSV: Tensor
    aux_loss: Tensor  # per-group aux loss, mean over MoE layers (0 for dense and with aux_loss_scope=global)
    z_loss: Tensor  # mean over MoE layers (0 for dense)
    moe_stats: list[MoEStats] = field(default_factory=list)  # one per MoE layer, in depth order


class Transformer(nn.Module):
    """The LM. ``dispatcher`` and ``expert_range`` let a parallel strategy shard experts;
    ``recompute`` is ``train.recompute`` (none | attention | block)."""

    def __init__(
        self,
        cfg: ModelConfig,
        moe_cfg: MoEConfig,
        vocab_size: int,
        seed: int,
        dispatcher: Dispatcher | None = None,
        expert_range: tuple[int, int] | None = None,
        recompute: str = "none",
    ) -> None:
        super().__init__()
        self.cfg, self.moe_cfg, self.seed = cfg, moe_cfg, seed
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        blocks = []
        for i in range(cfg.n_layers):
            if not is_moe_block(i, moe_cfg):
                ffn: nn.Module = SwiGLU(cfg.d_model, cfg.ffn_hidden)
            elif cfg.arch == "dense":
                ffn = SwiGLU(cfg.d_model, active_ffn_hidden(moe_cfg))
            else:
                ffn = MoELayer(cfg.d_model, moe_cfg, dispatcher, expert_range)
                ffn.layer_index = i
            blocks.append(Block(ffn, cfg, recompute))
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)
        init_weights(self, seed, cfg)

    def moe_layers(self) -> list[MoELayer]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoELayer)]

    def forward(self, idx_BS: Tensor, num_groups: int = 1) -> ModelOutput:
        """One batch through every block in turn, on one device (a dispatcher may move rows meanwhile).

        Several micro-batches in lockstep, with experts elsewhere, are the business of
        :func:`moe_trainer.parallel.schedule.run_microbatches`, which calls the same blocks.
        """
        x_BSD = self.embed(idx_BS)
        keys_BS = self.routing_keys(idx_BS)
        stats: list[MoEStats] = []
        for block in self.blocks:
            x_BSD, layer_stats = block(x_BSD, num_groups, keys_BS)
            if layer_stats is not None:
                stats.append(layer_stats)
        return self.output(x_BSD, stats)

    def routing_keys(self, idx_BS: Tensor) -> Tensor | None:
        """Each token's key for ``moe.selection_noise`` (training only; else None).

        Hashed from the token's row and position (:func:`~moe_trainer.moe.routing_noise.routing_keys`)
        and salted with the model's seed, so every layout draws the noise ``single`` draws.
        """
        if not (self.training and self.moe_cfg.selection_noise > 0 and self.moe_layers()):
            return None
        return routing_keys(idx_BS, self.seed)

    def output(self, x_BSD: Tensor, stats: list[MoEStats]) -> ModelOutput:
        """LM head and the losses of the MoE layers, from the last block's output."""
        logits = self.lm_head(self.norm(x_BSD))
        zero = logits.new_zeros((), dtype=torch.float32)
        aux = torch.stack([s.aux_loss for s in stats]).mean() if stats else zero
        z = torch.stack([s.z_loss for s in stats]).mean() if stats else zero
        return ModelOutput(logits, aux, z, stats)


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int, cfg: ModelConfig) -> None:
    """Normal(0, std) for matrices, ones for norms; residual outputs scaled by ``1/sqrt(2L)`` (GPT-2).

    Every tensor draws from its own generator seeded by (seed, name[, global expert]),
    so the result is independent of construction order and of expert placement. A model
    built on the ``meta`` device (shapes only, for counting) has no values to draw.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    out_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
    for mod_name, module in model.named_modules():
        if isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, SwiGLUExperts):
            for e in range(module.num_local):
                gid = module.first_expert + e
                gen = _generator(seed, f"{mod_name}.expert{gid}")
                module.w_gate_up_EDF2[e].copy_(torch.randn(module.w_gate_up_EDF2[e].shape, generator=gen)
                                               * cfg.init_std)
                module.w_down_EFD[e].copy_(torch.randn(module.w_down_EFD[e].shape, generator=gen) * out_std)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") or ".experts." in name:
            continue
        std = out_std if name.endswith(("attn.out.weight", "down.weight")) else cfg.init_std
        param.copy_(torch.randn(param.shape, generator=_generator(seed, name)) * std)


@dataclass(frozen=True)
class ParamCounts:
    total: int  # every parameter of the full model (all experts)
    active: int  # parameters a token passes through (k of E experts per MoE layer)
    experts: int  # routed-expert parameters of the full model


def count_parameters(model: Transformer) -> ParamCounts:
    """Counts for the *full* model, even when this instance holds only a shard of experts."""
    moe = model.moe_cfg
    top_k = experts_per_token(moe)
    total = active = experts = 0
    for module_name, param in model.named_parameters():
        if ".experts." in module_name:
            per_expert = param[0].numel()
            experts += per_expert * moe.num_experts
            total += per_expert * moe.num_experts
            active += per_expert * top_k
        else:
            total += param.numel()
            active += param.numel()
    return ParamCounts(total=total, active=active, experts=experts)
