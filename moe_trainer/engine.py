"""Engines run training steps for the driver; :class:`LocalEngine` is the in-process one.

The driver (:mod:`moe_trainer.driver`) talks to every strategy through the same
small interface, asking for chunks of steps, so the per-call overhead of a
remote engine (Ray actors) stays off the per-step path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch

from moe_trainer.config.schema import Config
from moe_trainer.config.validate import sequences_per_group
from moe_trainer.data import Tokenizer, build_batch_source
from moe_trainer.device import configure_process, single_device
from moe_trainer.host_memory import retain_freed_memory
from moe_trainer.hub.init_from import apply_init_from
from moe_trainer.model.transformer import Transformer, active_ffn_hidden, count_parameters
from moe_trainer.train.aggregate import aggregate_chunk
from moe_trainer.train.checkpoint import (
    DENSE_WIDTH_KEY,
    BackgroundSave,
    PendingCheckpoint,
    begin_checkpoint,
    check_checkpoint,
    save_checkpoint,
)
from moe_trainer.train.nan_guard import SkipPolicy, nonfinite_tensors, run_steps
from moe_trainer.train.run_tokenizer import saving_tokenizer, tokenizer_record
from moe_trainer.train.sharded_checkpoint import canonical_grads, load_into, save_shard
from moe_trainer.train.trainer import SingleContext, Trainer


class EngineLost(RuntimeError):
    """A process of the engine died (actor killed, node lost): the driver may rebuild and resume."""


class EngineStartError(RuntimeError):
    """The engine's processes could not be placed or could not form their process group in time."""


class Engine(Protocol):
    @property
    def step(self) -> int: ...

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        """Runs up to ``num_steps`` optimizer steps and returns one metrics record per step run.

        Fewer records come back when a non-finite step ends training (``train.on_nan``,
        ``train.max_skipped_steps``): the chunk ends right after that step, on every rank.
        """

    def evaluate(self) -> float: ...

    def request_stop(self) -> None:
        """Asks the chunk in flight to end after its current step (preemption); callable from any thread."""

    def nonfinite_state(self) -> list[str]:
        """Names (with the rank) of parameters or optimizer state holding NaN/inf on any process."""

    def save(self, root: Path) -> Path: ...

    def save_in_background(self, root: Path) -> None:
        """Starts saving the current state and returns once it is copied (``train.async_checkpoint``).

        The files are written while training goes on; the checkpoint exists only after
        :meth:`finish_save`, which the caller must call before the next save.
        """

    def finish_save(self) -> Path | None:
        """Completes the background save in flight, if any (waits for every rank's writes): its path, else None."""

    def load(self, path: Path) -> None: ...

    def info(self) -> dict[str, Any]:
        """Static facts for the run summary: parameter counts, memory per process."""

    def gradients(self) -> list[dict[str, torch.Tensor]]:
        """Each process's gradients after the last step, keyed like checkpoint entries (global experts).

        For checking a layout against ``single`` gradient by gradient; with ``train.grad_clip>0``
        they are the clipped gradients the optimizer applied.
        """

    def close(self, keep_cluster: bool = False) -> None: ...


def objective_signature(cfg: Config) -> dict[str, Any]:
    """The settings that define what is optimised beyond the model's shape, with their effective values.

    ``moe.group_sequences`` is recorded as the group size actually used: with null it follows
    the layout (one group per rank and micro-batch), and resuming under a layout that cuts
    other groups would silently change the objective. ``train.grad_accum_steps`` is recorded
    where it changes the objective: the global load-balancing loss counts each forward's
    rows, a ``1/grad_accum_steps`` share of the global batch (docs/architecture.md,
    "Gradient accumulation"); everything else is the large batch's objective exactly.
    """
    moe = cfg.moe
    grouped = moe.capacity_factor is not None or moe.router == "expert_choice" or moe.aux_loss_scope == "group"
    # dropless token choice with the global loss uses no groups: any group size is the same objective
    size = sequences_per_group(cfg) if grouped else "unused"
    objective: dict[str, Any] = {"moe.group_sequences": size, "moe.aux_loss_scope": moe.aux_loss_scope}
    if moe.aux_loss_scope == "global" and moe.router != "expert_choice":
        objective["train.grad_accum_steps"] = cfg.train.grad_accum_steps
    return objective


def checkpoint_signature(cfg: Config, tokenizer: Tokenizer) -> dict[str, Any]:
    """What must match for a checkpoint to load into this model (layout and strategy may differ).

    ``tokenizer_sha256`` is None for the byte tokenizer, which checkpoints made before it was
    recorded also read as (they hold no key, so ``meta.get`` gives None).
    """
    moe = cfg.moe
    return {
        "objective": objective_signature(cfg),
        "model": asdict(cfg.model),
        "experts": {"num_experts": moe.num_experts, "expert_hidden": moe.expert_hidden, "every": moe.every,
                    "num_shared_experts": moe.num_shared_experts,
                    "shared_expert_hidden": moe.shared_expert_hidden,
                    # only when set: checkpoints from before the setting hold no key and have no dense first blocks
                    **({"first_dense": moe.first_dense} if moe.first_dense else {}),
                    # a dense model's FFN width, which since 2026-12-04 counts the router (check_checkpoint)
                    **({DENSE_WIDTH_KEY: active_ffn_hidden(moe)} if cfg.model.arch == "dense" else {})},
        "vocab_size": tokenizer.vocab_size,
        "tokenizer_sha256": tokenizer.digest,
    }


def _checkpoint_meta(cfg: Config, tokenizer: Tokenizer) -> dict[str, Any]:
    """The signature, the tokenizer, and every routing setting (not checked at load: a resume may change
    e.g. ``moe.aux_loss_coef``), so that the checkpoint alone says how its model computes (``moe-export``)."""
    return {**checkpoint_signature(cfg, tokenizer), "tokenizer": tokenizer_record(tokenizer), "moe": asdict(cfg.moe)}


def save_engine_checkpoint(root: Path, step: int, write_shards: Callable[[Path], object], cfg: Config,
                           tokenizer: Tokenizer) -> Path:
    """Saves a checkpoint of any engine: its shards, the run's tokenizer.json, and the metadata load checks."""
    return save_checkpoint(root, step, saving_tokenizer(write_shards, tokenizer), _checkpoint_meta(cfg, tokenizer))


def begin_engine_checkpoint(root: Path, step: int, cfg: Config, tokenizer: Tokenizer) -> PendingCheckpoint:
    """The temporary directory of a background save, already holding the run's tokenizer.json (small: written now)."""
    pending = begin_checkpoint(root, step, _checkpoint_meta(cfg, tokenizer))
    saving_tokenizer(lambda _: None, tokenizer)(pending.tmp)
    return pending


def build_model(cfg: Config, vocab_size: int, **kwargs: Any) -> Transformer:
    """The model (or a rank's shard of it), initialised from ``train.seed`` or from ``train.init_from``."""
    model = Transformer(cfg.model, cfg.moe, vocab_size, cfg.train.seed, recompute=cfg.train.recompute, **kwargs)
    apply_init_from(model, cfg)
    return model


def model_parameter_counts(cfg: Config, vocab_size: int) -> dict[str, int]:
    """Total, active and expert parameters of the full model, without allocating or initialising it.

    The model is built on the ``meta`` device (shapes, no storage), so the counts come from
    the model code itself at no memory cost: the full fp32 Mixtral-8x7B shape would take
    about 190 GB of host memory to build for real.
    """
    with torch.device("meta"):
        counts = count_parameters(build_model(cfg, vocab_size))
    return {"params_total": counts.total, "params_active": counts.active, "params_experts": counts.experts}


class LocalEngine:
    """The ``single`` strategy: one process, everything local, the reference for all others.

    Runs on ``train.device`` (``auto``: the GPU when one is visible). The model is built
    and initialised on the CPU, then moved, so its weights are the same on every device.
    """

    def __init__(self, cfg: Config) -> None:
        if cfg.train.retain_freed_memory:
            retain_freed_memory()
        torch.manual_seed(cfg.train.seed)
        self.cfg = cfg
        device = single_device(cfg.train.device)
        configure_process(device)
        data = build_batch_source(cfg.data, cfg.train.batch_size, cfg.train.seed)
        self.tokenizer = data.tokenizer  # the embedding's size, and what every checkpoint saves
        model = build_model(cfg, data.vocab_size).to(device)
        self.trainer = Trainer(cfg, model, data, SingleContext(device))
        self.skips = SkipPolicy.from_config(cfg.train)
        self.background: BackgroundSave | None = None
        self.stop_requested = threading.Event()

    @property
    def step(self) -> int:
        return self.trainer.step

    def train(self, num_steps: int) -> list[dict[str, Any]]:
        # one rank: aggregation only adds the mean/_max/_per_rank keys every strategy logs
        return aggregate_chunk([run_steps(lambda: self.trainer.train_step().record, num_steps, self.skips,
                                          self.stop_requested.is_set)])

    def request_stop(self) -> None:
        self.stop_requested.set()

    def evaluate(self) -> float:
        return self.trainer.evaluate()

    def nonfinite_state(self) -> list[str]:
        return nonfinite_tensors(self.trainer.model, self.trainer.optimizer)

    def save(self, root: Path) -> Path:
        return save_engine_checkpoint(root, self.trainer.step, lambda d: save_shard(d, self.trainer), self.cfg,
                                      self.tokenizer)

    def save_in_background(self, root: Path) -> None:
        pending = begin_engine_checkpoint(root, self.trainer.step, self.cfg, self.tokenizer)
        self.background = BackgroundSave(pending, save_shard(pending.tmp, self.trainer, background=True))

    def finish_save(self) -> Path | None:
        background, self.background = self.background, None
        return None if background is None else background.finish()

    def load(self, path: Path) -> None:
        check_checkpoint(path, checkpoint_signature(self.cfg, self.tokenizer))
        load_into(path, self.trainer)

    def info(self) -> dict[str, Any]:
        return {**model_parameter_counts(self.cfg, self.tokenizer.vocab_size), "processes": 1}

    def gradients(self) -> list[dict[str, torch.Tensor]]:
        return [canonical_grads(self.trainer)]

    def close(self, keep_cluster: bool = False) -> None:
        """A background save still in flight here was cut off by an error: its writes end, it is deleted."""
        background, self.background = self.background, None
        if background is not None:
            try:
                background.wait()
            finally:
                background.pending.abandon()
