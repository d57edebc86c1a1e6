"""The training step, written once for every strategy.

A strategy differs only in its :class:`ParallelContext` (which slice of the batch
this process sees, how gradients and statistics are reduced) and in the
dispatcher/expert shard it gives the model. The single-process reference uses
:class:`SingleContext`, where every reduction is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_trainer.config.schema import Config
from moe_trainer.config.validate import micro_batches, sequences_per_group, sequences_per_micro_batch
from moe_trainer.device import to_device
from moe_trainer.model.transformer import ModelOutput, Transformer
from moe_trainer.moe.router import global_load_balancing_loss
from moe_trainer.parallel.schedule import run_microbatches
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timeline import is_sampled, timeline
from moe_trainer.timing import Span, mark
from moe_trainer.train.metrics import LoadCounts, balance_metrics
from moe_trainer.train.optim import apply_update, bias_rate_factor, build_optimizer, optimizer_state_mb, set_lr
from moe_trainer.train.precision import autocast

if TYPE_CHECKING:
    from moe_trainer.parallel.zero import OptimizerShards


class BatchSource(Protocol):
    def train_batch(self, step: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]: ...

    def val_batches(self, n: int, batch_size: int) -> list[tuple[Tensor, Tensor]]: ...


class ParallelContext(Protocol):
    """What the step needs from a parallel strategy.

    Two optional attributes name the rank in step timelines (:mod:`moe_trainer.timeline`):
    ``global_rank`` (its rank in the whole job, not ``dp_rank``) and ``role`` (``trainer``,
    ``coordinator``...); a context without them is rank 0 of role ``single``.
    """

    dp_rank: int  # this process's data-parallel rank (which rows of the global batch it reads)
    dp_world: int  # number of data-parallel ranks
    device: torch.device  # where this rank's model and batches live

    def sync_gradients(self, model: Transformer) -> None:
        """Makes every gradient the gradient of the global-batch loss."""

    def grad_norm(self, model: Transformer) -> Tensor:
        """The gradient norm over the *whole* model (all shards); clipping happens in the optimizer step."""

    def all_reduce_sum(self, t: Tensor, label: str = "metrics") -> Tensor:
        """Sums a tensor over the data-parallel ranks (``label`` names it in a collective error)."""

    def telemetry(self) -> dict[str, float]:
        """Per-rank communication counters since the last call (empty when nothing communicates)."""


class SingleContext:
    """One process holds everything: reductions are identities."""

    dp_rank = 0
    dp_world = 1
    global_rank = 0
    role = "single"

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device if device is not None else torch.device("cpu")

    def sync_gradients(self, model: Transformer) -> None:
        return None

    def grad_norm(self, model: Transformer) -> Tensor:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))

    def all_reduce_sum(self, t: Tensor, label: str = "metrics") -> Tensor:
        return t

    def telemetry(self) -> dict[str, float]:
        # nothing moves, but the keys are the same as every other strategy's (zeros)
        return {**CommCounters().take(), "grad_sync_time_s": 0.0}


def process_memory_mb() -> float:
    """Resident memory of this process (MiB); on GPU, the peak allocated CUDA memory instead.

    Without psutil (the torch-only GPU check machine) the resident size comes from
    ``/proc/self/statm`` (Linux).
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        import psutil
    except ImportError:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return psutil.Process().memory_info().rss / 2**20


def process_peak_memory_mb() -> float:
    """Peak resident host memory of this process since it started (MiB): ``VmHWM``, on GPU machines too.

    The current size (:func:`process_memory_mb`) misses what start-up and checkpoint loads took
    and then freed; a process killed for memory is killed at its peak, so that is what a memory
    budget must be checked against. (On GPU, ``mem_rss_mb`` is the peak CUDA memory.)
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    return process_memory_mb()  # no /proc (not Linux): the current size is the best known


@dataclass
class LossParts:
    """This rank's losses for one forward (means over its micro-batches) and the router loads.

    ``counts`` covers all data-parallel ranks' rows of the forward (summed over ranks) for a
    training forward, this rank's rows for an evaluation forward; ``local_counts`` always this
    rank's rows.
    """

    total: Tensor
    lm: Tensor
    aux: Tensor
    z: Tensor
    counts: LoadCounts
    local_counts: LoadCounts

    def detached(self) -> LossParts:
        """The values without the graph, which its backward has used up."""
        return LossParts(self.total.detach(), self.lm.detach(), self.aux.detach(), self.z.detach(), self.counts,
                         self.local_counts)

    @classmethod
    def mean(cls, parts: list[LossParts]) -> LossParts:
        """The step's values from its accumulation steps: losses averaged, loads summed (exact)."""
        def avg(name: str) -> Tensor:
            return torch.stack([getattr(p, name) for p in parts]).mean()

        return cls(avg("total"), avg("lm"), avg("aux"), avg("z"), LoadCounts.total([p.counts for p in parts]),
                   LoadCounts.total([p.local_counts for p in parts]))


@dataclass
class StepResult:
    step: int
    record: dict[str, Any]  # the metrics record logged for this step


class Trainer:
    """Owns model, optimizer and step counter of one process; strategies call :meth:`train_step`."""

    def __init__(self, cfg: Config, model: Transformer, data: BatchSource, ctx: ParallelContext,
                 shards: OptimizerShards | None = None) -> None:
        """``shards``: this rank's share of the optimizer state (``parallel.shard_optimizer``); None = all of it."""
        self.cfg, self.model, self.data, self.ctx = cfg, model, data, ctx
        self.shards = shards
        self.optimizer = build_optimizer(model, cfg.train, shards.owns if shards is not None else None)
        self.param_names = {id(p): name for name, p in model.named_parameters()}
        self.step = 0  # optimizer steps taken
        self.tokens_seen = 0  # global tokens trained on
        self.micro_batches = micro_batches(cfg)
        self.groups_per_micro_batch = sequences_per_micro_batch(cfg) // sequences_per_group(cfg)
        self.accum_steps = cfg.train.grad_accum_steps

    def accumulation_shares(self) -> list[tuple[int, int]]:
        """``(share, shares)`` of the global batch this rank reads in each accumulation step.

        Accumulation step ``a`` is the ``a``-th ``1/grad_accum_steps`` of the global batch, cut
        over the data-parallel ranks as the whole batch is without accumulation. Every layout
        thus runs the same global rows in the same forward, which keeps the global aux loss
        (counted per forward) independent of the layout.
        """
        ranks = self.ctx.dp_world
        return [(a * ranks + self.ctx.dp_rank, self.accum_steps * ranks) for a in range(self.accum_steps)]

    def loss(self, inputs: Tensor, targets: Tensor, training: bool = True) -> LossParts:
        """LM cross-entropy (mean over this rank's tokens) plus weighted router losses.

        Micro-batches have equal sizes, so the mean of their means is the mean over the rows.
        Training sums the router loads over the data-parallel ranks here, before backward:
        the global aux loss needs them (this forward's rows of every rank), and the bias update
        and metrics reuse them (summed over the step's accumulation steps).
        The forward runs under ``train.precision`` (evaluation too); the losses are fp32.
        """
        chunks = list(inputs.chunk(self.micro_batches))
        with autocast(self.cfg.train.precision, self.ctx.device):
            outs = run_microbatches(self.model, chunks, self.groups_per_micro_batch)
        lm = torch.stack([F.cross_entropy(out.logits_BSV.flatten(0, 1).float(), t.flatten())
                          for out, t in zip(outs, targets.chunk(self.micro_batches), strict=True)]).mean()
        z = torch.stack([out.z_loss for out in outs]).mean()
        local = LoadCounts.total([LoadCounts.from_stats(out.moe_stats, self.cfg.moe.num_experts) for out in outs])
        counts = self._global_counts(local) if training else local
        aux = self._aux_loss(outs, counts, training)
        total = lm + self.cfg.moe.aux_loss_coef * aux + self.cfg.moe.z_loss_coef * z
        return LossParts(total, lm, aux, z, counts, local)

    def _aux_loss(self, outs: list[ModelOutput], counts: LoadCounts, training: bool) -> Tensor:
        """Per-group aux loss from the router, or the global one from the counts summed over ranks.

        "Global" is every rank's rows of this forward: the global batch, or with
        ``train.grad_accum_steps > 1`` its accumulation step's share (counts of later passes do
        not exist before this pass's backward; see docs/architecture.md, "Gradient accumulation").
        Expert choice is balanced by construction (no aux loss); evaluation needs none.
        """
        moe = self.cfg.moe
        if moe.aux_loss_scope == "group" or moe.router == "expert_choice" or not outs[0].moe_stats:
            return torch.stack([out.aux_loss for out in outs]).mean()
        if not training:
            return outs[0].aux_loss.new_zeros(())
        mean_probs_LE = torch.stack([torch.stack([s.mean_probs_E for s in out.moe_stats]) for out in outs]).mean(0)
        return global_load_balancing_loss(mean_probs_LE, counts.tokens_per_expert_LE.to(mean_probs_LE.device))

    def train_step(self) -> StepResult:
        """One optimizer step over the global batch, in ``train.grad_accum_steps`` forward/backward passes.

        Each pass's loss is divided by the number of passes, so the accumulated gradient is the
        mean over the step's rows, as one pass over the whole batch would give. A sampled step
        (``logger.timeline_every``) also records its timeline, returned under ``"timeline"``.
        """
        self.ctx.telemetry()  # drop what evaluation moved since the last step: records cover this step only
        device = self.ctx.device
        step = self.step + 1  # the number this step's record carries
        timeline.begin_step(step, getattr(self.ctx, "global_rank", 0), getattr(self.ctx, "role", "single"), device,
                            is_sampled(step, self.cfg.logger.timeline_every))
        t0 = mark(device)
        lr = set_lr(self.optimizer, self.step, self.cfg.train)
        self.model.train()
        self.model.zero_grad(set_to_none=True)  # every gradient: a sharded optimizer holds only the owned ones
        passes, tokens = [], 0
        for a, (share, shares) in enumerate(self.accumulation_shares()):
            inputs, targets = self._to_device(self.data.train_batch(self.step, share, shares))
            with timeline.region("forward", "compute", device, {"pass": a}):
                part = self.loss(inputs, targets)
            with timeline.region("backward", "compute", device, {"pass": a}):
                (part.total / self.accum_steps).backward()
            passes.append(part.detached())
            tokens += inputs.numel() * self.ctx.dp_world
        parts = LossParts.mean(passes)
        with timeline.region("grad sync", "sync", device):
            self.ctx.sync_gradients(self.model)
        with timeline.region("grad norm", "sync", device):
            grad_norm = self.ctx.grad_norm(self.model)
        with timeline.region("optimizer", "optimizer", device):
            finite = apply_update(self.optimizer, grad_norm, self.cfg.train.grad_clip)
            counts = parts.counts  # the global batch's loads (all passes): every replica makes the same bias update
            bias_rate = bias_rate_factor(self.step, self.cfg.moe, self.cfg.train)
            for layer, load_E in zip(self.model.moe_layers(), counts.tokens_per_expert_LE, strict=True):
                if finite:
                    layer.router.update_bias(load_E, bias_rate)
        if self.shards is not None:
            with timeline.region("parameter broadcast", "sync", device):
                self.shards.after_step(self.model, finite)
        with timeline.region("loss all-reduce", "sync", device):
            losses = self.ctx.all_reduce_sum(torch.stack([parts.lm, parts.aux, parts.z, parts.total]).detach()
                                             .double())
        losses = losses / self.ctx.dp_world
        step_time = Span.since(t0, device).seconds()  # on GPU: the step's one wait for its timings
        events = timeline.end_step()  # after the step's wait: resolving its spans costs nothing more
        self.step += 1
        self.tokens_seen += tokens
        record: dict[str, Any] = {
            "step": self.step,
            "loss": float(losses[0]),
            "aux_loss": float(losses[1]),
            "z_loss": float(losses[2]),
            "total_loss": float(losses[3]),
            "lr": lr,
            "grad_norm": float(grad_norm),
            "step_skipped": not finite,  # non-finite loss or gradient: the update was not applied
            "tokens": self.tokens_seen,
            "tokens_step": tokens,
            "step_time_s": step_time,
            "tokens_per_s": tokens / step_time,
            **balance_metrics(counts),
            # this rank's own rows: how far local batches are from the global balance
            "load_imbalance_local": balance_metrics(parts.local_counts)["load_imbalance"],
            "mem_rss_mb": process_memory_mb(),
            "mem_peak_rss_mb": process_peak_memory_mb(),
            **self._optimizer_memory(),
            **self.ctx.telemetry(),
        }
        bias = [layer.router.expert_bias.tolist() for layer in self.model.moe_layers()]
        if self.cfg.moe.bias_balancing:
            record["expert_bias"] = bias
        if events is not None:
            record["timeline"] = events
        return StepResult(self.step, record)

    def _optimizer_memory(self) -> dict[str, float]:
        """This rank's optimizer state (all, dense) and the time it spent broadcasting sharded updates."""
        total, dense = optimizer_state_mb(self.optimizer, self.param_names)
        sync = self.shards.take_time() if self.shards is not None else 0.0
        return {"mem_optim_state_mb": total, "mem_optim_dense_state_mb": dense, "param_sync_time_s": sync}

    def _global_counts(self, local: LoadCounts) -> LoadCounts:
        with timeline.region("router loads all-reduce", "sync", self.ctx.device):
            summed = self.ctx.all_reduce_sum(local.as_tensor(), "router loads (global aux loss, bias, metrics)")
        # every data-parallel rank runs the same number of micro-batches
        return LoadCounts.from_tensor(summed, local.num_layers, self.cfg.moe.num_experts,
                                      local.batches * self.ctx.dp_world)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean LM loss over the fixed validation batches (this rank's rows, averaged over ranks)."""
        self.model.eval()
        batches = self.data.val_batches(self.cfg.train.eval_batches, self.cfg.train.batch_size)
        total = torch.zeros((), dtype=torch.float64, device=self.ctx.device)
        for inputs, targets in batches:
            # the forwards of a training step: same rows per forward, hence the same routing groups
            for share, shares in self.accumulation_shares():
                rows = slice(share * inputs.shape[0] // shares, (share + 1) * inputs.shape[0] // shares)
                parts = self.loss(*self._to_device((inputs[rows], targets[rows])), training=False)
                total += parts.lm.double() / self.accum_steps
        total = self.ctx.all_reduce_sum(total) / self.ctx.dp_world
        return float(total / max(1, len(batches)))

    def _to_device(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        return to_device(batch[0], self.ctx.device), to_device(batch[1], self.ctx.device)
