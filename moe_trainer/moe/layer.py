"""MoE layer: route -> dispatch -> experts -> combine (+ shared experts).

The layer is written for one device; parallel strategies swap in another
dispatcher and another expert shard, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from moe_trainer.config.schema import MoEConfig
from moe_trainer.model.layers import SwiGLU
from moe_trainer.model.recompute import recomputed
from moe_trainer.moe.dispatcher import Dispatched, Dispatcher
from moe_trainer.moe.expert_kernels import compute_dtype
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.moe.router import Router, Routing


@dataclass(frozen=True)
class MoEStats:
    """Per-layer losses (with grad) and detached load statistics of one forward pass."""

    aux_loss: Tensor  # per-group load-balancing loss (differentiable; 0 with aux_loss_scope=global)
    mean_probs_E: Tensor  # fp32 [E] mean router probability over the batch (differentiable; global aux loss)
    z_loss: Tensor  # router z-loss (differentiable)
    tokens_per_expert_E: Tensor  # int64 [E] assignments per expert before drops
    dropped: Tensor  # int64 scalar: assignments dropped past capacity
    assignments: int  # token-expert assignments made
    router_entropy: Tensor  # mean entropy (nats) of the per-token router distribution


@dataclass(frozen=True)
class PendingMoE:
    """A micro-batch between :meth:`MoELayer.start` and :meth:`MoELayer.finish`."""

    x_BSD: Tensor
    x_TD: Tensor  # the rows in the dispatch dtype (:func:`~moe_trainer.moe.expert_kernels.compute_dtype`)
    routing: Routing
    dispatched: Dispatched
    y_ND: Tensor | None = None  # expert outputs, once :meth:`MoELayer.compute` ran


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN: ``y = sum_k g_k E_k(x) (+ shared(x))``."""

    def __init__(
        self,
        d_model: int,
        cfg: MoEConfig,
        dispatcher: Dispatcher | None = None,
        expert_range: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        first, count = expert_range if expert_range is not None else (0, cfg.num_experts)
        self.router = Router(d_model, cfg)
        self.experts = SwiGLUExperts(count, d_model, cfg.expert_hidden, first_expert=first)
        self.shared = (
            SwiGLU(d_model, cfg.num_shared_experts * cfg.shared_expert_hidden) if cfg.num_shared_experts else None
        )
        self.dispatcher = dispatcher or Dispatcher(cfg.num_experts, cfg.capacity_factor)
        self.layer_index = -1  # block index, set by the model; names the layer in communication errors
        self.recompute = False  # train.recompute=block: shared and routed experts rebuild their activations

    def set_recompute(self, on: bool) -> None:
        """Whether backward recomputes the experts' hidden activations (the input rows stay kept)."""
        self.recompute = on
        self.experts.recompute = on  # the expert function keeps only its input rows

    def forward(self, x_BSD: Tensor, num_groups: int = 1, noise_keys_BS: Tensor | None = None
                ) -> tuple[Tensor, MoEStats]:
        return self.finish(self.start(x_BSD, num_groups, noise_keys_BS=noise_keys_BS))

    def route(self, x_BSD: Tensor, num_groups: int = 1, noise_keys_BS: Tensor | None = None) -> Routing:
        """The router on the flattened tokens: local math, which a recompute region may include.

        ``noise_keys_BS``: the tokens' keys for ``moe.selection_noise``
        (:meth:`~moe_trainer.model.transformer.Transformer.routing_keys`).
        """
        keys_T = noise_keys_BS.reshape(-1) if noise_keys_BS is not None else None
        return self.router(x_BSD.reshape(-1, x_BSD.shape[-1]), num_groups, keys_T, self.layer_index)

    def start(self, x_BSD: Tensor, num_groups: int = 1, routing: Routing | None = None,
              noise_keys_BS: Tensor | None = None) -> PendingMoE:
        """Routes (unless ``routing`` is given) and dispatches; the experts' work may then happen
        elsewhere while the caller goes on.

        Splitting the layer here lets a pipelined caller start several micro-batches
        before finishing any (see :func:`moe_trainer.parallel.schedule.run_microbatches`).
        """
        x_TD = x_BSD.reshape(-1, x_BSD.shape[-1])
        if routing is None:
            routing = self.route(x_BSD, num_groups, noise_keys_BS)  # fp32 whatever the dtype of x
        # cast once before the dispatch (not inside the experts): every all-to-all payload is then
        # in the compute dtype, bf16 under train.precision=bf16; a no-op in fp32
        x_TD = x_TD.to(compute_dtype(x_TD))
        dispatched = self.dispatcher.dispatch(x_TD, routing, num_groups, layer=self.layer_index)
        return PendingMoE(x_BSD, x_TD, routing, dispatched)

    def finish(self, pending: PendingMoE) -> tuple[Tensor, MoEStats]:
        """Runs the local experts on the dispatched rows, combines, adds shared experts."""
        return self.complete(self.compute(pending))

    def compute(self, pending: PendingMoE) -> PendingMoE:
        """The local experts' part; an asynchronous dispatcher leaves the results in flight."""
        return replace(pending, y_ND=self.dispatcher.run_experts(self.experts, pending.dispatched))

    def complete(self, pending: PendingMoE) -> tuple[Tensor, MoEStats]:
        """Combines the expert outputs back into token order, adds shared experts, gathers statistics.

        The combine sums gate-weighted rows in fp32 (the gate weights are fp32), so under bf16
        the layer's output joins the fp32 residual stream with one rounding per expert output.
        """
        dispatched, routing, x_TD = pending.dispatched, pending.routing, pending.x_TD
        assert pending.y_ND is not None, "compute() first"
        y_TD = self.dispatcher.combine(pending.y_ND, dispatched)
        if self.shared is not None:
            y_TD = y_TD + (recomputed(self.shared, x_TD) if self.recompute else self.shared(x_TD))
        with torch.no_grad():
            probs = routing.probs_TE
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
        stats = MoEStats(
            aux_loss=routing.aux_loss,
            mean_probs_E=routing.probs_TE.mean(dim=0),
            z_loss=routing.z_loss,
            tokens_per_expert_E=routing.tokens_per_expert_E.detach(),
            dropped=dispatched.plan.dropped,
            assignments=routing.expert_idx_A.numel(),
            router_entropy=entropy,
        )
        return y_TD.view_as(pending.x_BSD), stats
