"""One validation pass over the whole config, run before any actor, file or W&B run exists.

Types and unknown keys are caught earlier by the structured schema; this module
checks ranges and cross-field constraints. Each check raises a
:class:`ConfigError` naming the setting, its value, the constraint and the fix; a
suggested value is offered only when the whole config validates with it
(:mod:`moe_trainer.config.fixes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.fixes import batch_unit, divisors, even_share_fixes, nearest_multiples, passing, refusal
from moe_trainer.config.schema import (
    ARCHS,
    AUX_LOSS_SCOPES,
    BIAS_UPDATE_SCHEDULES,
    BIAS_UPDATES,
    DATA_FORMATS,
    DEVICES,
    LOGGER_MODES,
    NAN_POLICIES,
    PLACEMENTS,
    PRECISIONS,
    RECOMPUTE_MODES,
    ROUTER_TYPES,
    SCORE_ORDERS,
    STRATEGIES,
    Config,
    is_moe_block,
)
from moe_trainer.parallel.resources import ROLE_SETTINGS, role_resources

# Strategies whose runtime exists; the others are named in the schema so users get
# "not available yet" instead of "unknown".
AVAILABLE_STRATEGIES = STRATEGIES


def micro_batches(cfg: Config) -> int:
    """Micro-batches per rank and step: the disaggregated and expert_parallel strategies pipeline them."""
    return cfg.parallel.micro_batches if cfg.parallel.strategy in ("disaggregated", "expert_parallel") else 1


def data_parallel_ranks(cfg: Config) -> int:
    """Ranks that each train on their own rows of the global batch (disaggregated: the coordinators)."""
    p = cfg.parallel
    return {"single": 1, "disaggregated": p.num_coordinators}.get(p.strategy, p.num_actors)


def sequences_per_forward(cfg: Config) -> int:
    """Sequences one rank runs in one forward: its share of one accumulation step (``train.grad_accum_steps``)."""
    return cfg.train.batch_size // (data_parallel_ranks(cfg) * cfg.train.grad_accum_steps)


def sequences_per_micro_batch(cfg: Config) -> int:
    """Sequences of the global batch that one rank runs in one micro-batch of one forward."""
    return sequences_per_forward(cfg) // micro_batches(cfg)


def sequences_per_group(cfg: Config) -> int:
    """Sequences in one routing group: ``moe.group_sequences``, or (null) one rank's micro-batch.

    A fixed number makes capacity, expert choice and the per-group aux loss independent of
    the layout; null is GShard's one group per rank and micro-batch, which is not.
    """
    if cfg.moe.group_sequences is not None:
        return cfg.moe.group_sequences
    return sequences_per_micro_batch(cfg)


def _passing_values(cfg: Config, setting: str, values: Iterable[object]) -> list[object]:
    """Those `values` of `setting` with which the whole config validates (for "use X in [...]")."""
    return [fix[setting] for fix in passing(cfg, ({setting: v} for v in values), limit=1_000)
            if len(fix) == 1]


def _one_of(setting: str, value: object, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(setting, value, f"must be one of {', '.join(map(str, allowed))}")


def _positive(setting: str, value: float, *, allow_zero: bool = False) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if not math.isfinite(value):
        raise ConfigError(setting, value, f"must be a finite number {bound}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(setting, value, f"must be {bound}")


def validate_model(cfg: Config) -> None:
    m = cfg.model
    _one_of("model.arch", m.arch, ARCHS)
    for name in ("d_model", "n_layers", "n_heads", "max_seq_len", "ffn_hidden"):
        _positive(f"model.{name}", getattr(m, name))
    if m.d_model % m.n_heads:
        raise ConfigError("model.n_heads", m.n_heads, f"must divide model.d_model={m.d_model}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError("model.n_heads", m.n_heads,
                          f"head width d_model/n_heads={m.d_model // m.n_heads} must be even for rotary positions")
    _positive("model.rope_theta", m.rope_theta)
    _positive("model.norm_eps", m.norm_eps)
    _positive("model.init_std", m.init_std)


def validate_moe(cfg: Config) -> None:
    moe = cfg.moe
    _positive("moe.num_experts", moe.num_experts)
    _one_of("moe.router", moe.router, ROUTER_TYPES)
    _one_of("moe.score_order", moe.score_order, SCORE_ORDERS)
    if moe.top_k < 1 or moe.top_k > moe.num_experts:
        raise ConfigError("moe.top_k", moe.top_k, f"must be between 1 and moe.num_experts={moe.num_experts}")
    if moe.router == "topk" and moe.score_order == "topk_softmax" and moe.top_k == 1:
        raise ConfigError("moe.top_k", moe.top_k, "softmax over a single logit is always 1 and the router gets no "
                          "gradient; use moe.score_order=softmax_topk or moe.router=switch for top-1")
    _positive("moe.every", moe.every)
    if moe.every > cfg.model.n_layers:
        raise ConfigError("moe.every", moe.every, f"must be <= model.n_layers={cfg.model.n_layers}, "
                          "or no block gets an MoE layer")
    if moe.first_dense < 0 or not any(is_moe_block(i, moe) for i in range(cfg.model.n_layers)):
        raise ConfigError("moe.first_dense", moe.first_dense, "must be between 0 and the last MoE block's index "
                          f"(model.n_layers={cfg.model.n_layers}, moe.every={moe.every}), or no block gets an "
                          "MoE layer")
    _positive("moe.expert_hidden", moe.expert_hidden)
    if moe.capacity_factor is not None:
        _positive("moe.capacity_factor", moe.capacity_factor)
    _positive("moe.routed_scale", moe.routed_scale)
    _positive("moe.aux_loss_coef", moe.aux_loss_coef, allow_zero=True)
    _positive("moe.z_loss_coef", moe.z_loss_coef, allow_zero=True)
    _positive("moe.bias_update_rate", moe.bias_update_rate, allow_zero=True)
    _one_of("moe.bias_update", moe.bias_update, BIAS_UPDATES)
    _one_of("moe.bias_update_schedule", moe.bias_update_schedule, BIAS_UPDATE_SCHEDULES)
    _positive("moe.selection_noise", moe.selection_noise, allow_zero=True)
    if moe.router == "expert_choice" and (moe.bias_balancing or moe.selection_noise > 0):
        # both are token-choice selection aids (the default has both on): one message names every change
        offs = [off for off, on in (("moe.bias_balancing=false", moe.bias_balancing),
                                    ("moe.selection_noise=0", moe.selection_noise > 0)) if on]
        setting, value = ("moe.bias_balancing", True) if moe.bias_balancing else ("moe.selection_noise",
                                                                                 moe.selection_noise)
        raise ConfigError(setting, value, "does nothing with moe.router=expert_choice: a per-expert bias or "
                          "selection noise changes which experts a token picks, and under expert choice the "
                          "experts pick their tokens (balanced by construction); use " + " ".join(offs)
                          + ", or a token-choice router (topk, switch)")
    _positive("moe.num_shared_experts", moe.num_shared_experts, allow_zero=True)
    _positive("moe.shared_expert_hidden", moe.shared_expert_hidden)
    _one_of("moe.aux_loss_scope", moe.aux_loss_scope, AUX_LOSS_SCOPES)
    if moe.group_sequences is not None:
        _positive("moe.group_sequences", moe.group_sequences)


def validate_parallel(cfg: Config) -> None:
    p = cfg.parallel
    _one_of("parallel.strategy", p.strategy, STRATEGIES)
    if p.strategy not in AVAILABLE_STRATEGIES:
        raise ConfigError("parallel.strategy", p.strategy,
                          f"is not available yet in this version; available: {', '.join(AVAILABLE_STRATEGIES)}")
    _positive("parallel.num_actors", p.num_actors)
    _positive("parallel.gpus_per_actor", p.gpus_per_actor, allow_zero=True)
    _positive("parallel.cpus_per_actor", p.cpus_per_actor, allow_zero=True)
    _one_of("parallel.placement", p.placement, PLACEMENTS)
    _positive("parallel.timeout_s", p.timeout_s)
    if p.strategy == "expert_parallel":
        validate_expert_parallel(cfg)
    elif p.a2a_chunks != 1:
        raise ConfigError("parallel.a2a_chunks", p.a2a_chunks, "only parallel.strategy=expert_parallel overlaps "
                          f"all-to-alls with expert compute; use 1 with parallel.strategy={p.strategy}")
    if p.strategy not in ("expert_parallel", "disaggregated") and p.micro_batches != 1:
        raise ConfigError("parallel.micro_batches", p.micro_batches,
                          "only parallel.strategy=expert_parallel (micro-batches overlapping each other's "
                          "all-to-alls) and disaggregated (micro-batches pipelined between coordinators and expert "
                          f"actors) use micro-batches; parallel.strategy={p.strategy} has nothing to overlap: use 1")
    if p.shard_optimizer:
        validate_shard_optimizer(cfg)
    if p.strategy == "disaggregated":
        validate_disaggregated(cfg)
    else:
        for setting, value in _role_settings_set(cfg):
            raise ConfigError(setting, value, "sizes one role of parallel.strategy=disaggregated (coordinators or "
                              f"expert actors); parallel.strategy={p.strategy} has no roles: leave it unset (null) "
                              "and size actors with parallel.cpus_per_actor / parallel.gpus_per_actor")


def validate_shard_optimizer(cfg: Config) -> None:
    """Refuses ``parallel.shard_optimizer`` where no two ranks hold the same parameters: it would change nothing.

    State is shared out among the data-parallel ranks (dense) and the expert-data-parallel
    replicas (experts); expert actors of ``disaggregated`` hold the only copy of their experts.
    """
    ranks = data_parallel_ranks(cfg)
    if ranks > 1:
        return
    what = {"single": "parallel.strategy=single runs one process",
            "disaggregated": "parallel.num_coordinators=1 leaves the dense parameters on one rank, and expert "
                             "actors hold the only copy of their experts"}.get(
        cfg.parallel.strategy, f"parallel.num_actors={cfg.parallel.num_actors} is one data-parallel rank")
    raise ConfigError("parallel.shard_optimizer", True, f"shares the optimizer state out among ranks holding the "
                      f"same parameters, but {what}, so there is nothing to share; use parallel.shard_optimizer="
                      "false, or 2 or more data-parallel ranks (parallel.num_actors, or parallel.num_coordinators "
                      "for disaggregated)")


def _role_settings_set(cfg: Config) -> list[tuple[str, float]]:
    """The per-role settings (``parallel.cpus_per_coordinator``, ...) the user set, with their values."""
    values = [(s, getattr(cfg.parallel, s.removeprefix("parallel."))) for s in ROLE_SETTINGS]
    return [(s, v) for s, v in values if v is not None]


def validate_expert_parallel(cfg: Config) -> None:
    """Errors name the setting the user wrote: with ``ep_size`` unset the size is ``num_actors``."""
    p, experts = cfg.parallel, cfg.moe.num_experts
    if p.ep_size is not None and not 1 <= p.ep_size <= p.num_actors:
        raise ConfigError("parallel.ep_size", p.ep_size, f"must be between 1 and parallel.num_actors={p.num_actors}")
    ep = p.ep_size if p.ep_size is not None else p.num_actors
    size = "parallel.ep_size" if p.ep_size is not None else "parallel.num_actors"
    size_text = f"{size}={ep}" + ("" if p.ep_size is not None else " (the expert-parallel size while "
                                                                    "parallel.ep_size is unset)")
    if p.num_actors % ep:
        raise ConfigError("parallel.ep_size", ep, f"must divide parallel.num_actors={p.num_actors} so every "
                          "expert-parallel group is complete")
    if experts % ep:
        if ep > experts:  # more actors than experts: the size is what is wrong
            sizes = _passing_values(cfg, size, divisors(experts))
            replicas = [] if p.ep_size is not None else _passing_values(
                cfg, "parallel.ep_size", [d for d in divisors(experts) if p.num_actors % d == 0])
            raise ConfigError(size, ep, f"is more than the moe.num_experts={experts} experts to share out; every "
                              "actor of an expert-parallel group needs the same number of experts"
                              + (f": use {size} in {sizes}" if sizes else "")
                              + (f", or keep the actors and set parallel.ep_size in {replicas} (the other actors "
                                 "hold expert-data-parallel replicas)" if replicas else ""))
        raise refusal(cfg, "moe.num_experts", experts,
                      f"must be divisible by {size_text} so every actor holds the same number of experts",
                      even_share_fixes(experts, size, ep))
    _positive("parallel.micro_batches", p.micro_batches)
    _positive("parallel.a2a_chunks", p.a2a_chunks)
    if p.a2a_chunks > 1 and p.micro_batches > 1:
        raise ConfigError("parallel.a2a_chunks", p.a2a_chunks, "overlaps within a micro-batch; with "
                          f"parallel.micro_batches={p.micro_batches} the micro-batches already overlap each "
                          "other's all-to-alls: set one of the two to 1")
    if p.a2a_chunks > 1 and (ep == 1 or p.a2a_chunks > experts // ep):
        raise ConfigError("parallel.a2a_chunks", p.a2a_chunks,
                          f"must be between 1 and the {experts // ep} experts each actor holds "
                          f"(moe.num_experts / {size_text}), and 1 when the expert-parallel size is 1 "
                          "(no all-to-all)")


def validate_disaggregated(cfg: Config) -> None:
    p = cfg.parallel
    _positive("parallel.num_coordinators", p.num_coordinators)
    if p.num_expert_actors < 1:
        raise ConfigError("parallel.num_expert_actors", p.num_expert_actors,
                          "must be >= 1: the disaggregated strategy needs actors to hold the experts")
    experts = cfg.moe.num_experts
    if experts % p.num_expert_actors:
        raise refusal(cfg, "moe.num_experts", experts,
                      f"must be divisible by parallel.num_expert_actors={p.num_expert_actors} so every expert "
                      "actor holds the same number of experts",
                      even_share_fixes(experts, "parallel.num_expert_actors", p.num_expert_actors))
    _positive("parallel.micro_batches", p.micro_batches)
    for setting, value in _role_settings_set(cfg):
        _positive(setting, value, allow_zero=True)
    if cfg.model.arch == "dense":
        raise ConfigError("model.arch", "dense", "the disaggregated strategy needs MoE layers to hand to expert "
                          "actors; use data_parallel for the dense baseline")


def validate_device(cfg: Config) -> None:
    """Where ranks compute: ``train.device`` for ``single``, one whole GPU per rank (or none) for Ray strategies.

    Every Ray rank joins one NCCL communicator when GPUs are asked for, and NCCL refuses
    two ranks of a communicator on one GPU; a rank drives one device, so a second GPU
    per actor would only be reserved and sit idle. The disaggregated roles are checked
    each by the setting that sizes it (per-role or ``parallel.gpus_per_actor``), and
    must agree: one process group has one backend, NCCL for all ranks or gloo for all.
    """
    t, p = cfg.train, cfg.parallel
    if p.strategy == "single":
        if t.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError("train.device", "cuda", "no CUDA GPU is visible to this process "
                                  "(torch.cuda.is_available() is False); use train.device=auto (a GPU when there is "
                                  "one, else the CPU) or train.device=cpu")
        return
    roles = role_resources(cfg)
    for role in roles:
        _one_whole_gpu(role.gpus_setting, role.gpus)
        if role.cpus == 0 and role.gpus == 0:
            raise ConfigError(role.cpus_setting, 0.0, f"each {role.role} would reserve nothing, and Ray cannot "
                              "place an actor that reserves nothing in the job's placement group; reserve a "
                              f"share of a CPU ({role.cpus_setting}=0.1) or a GPU")
    if len({role.gpus for role in roles}) > 1:
        gpu, cpu = next(r for r in roles if r.gpus), next(r for r in roles if not r.gpus)
        written = next((r for r in roles if r.gpus_setting != "parallel.gpus_per_actor"), gpu)
        raise ConfigError(written.gpus_setting, written.gpus,
                          f"{gpu.role}s would compute on GPUs ({gpu.gpus_setting}={gpu.gpus:g}) and {cpu.role}s "
                          f"on CPUs ({cpu.gpus_setting}={cpu.gpus:g}), but all ranks form one process group with "
                          f"one backend (NCCL on GPUs or gloo on CPUs, never a mix); use {cpu.gpus_setting}=1 "
                          f"(every rank on a GPU) or {gpu.gpus_setting}=0 (every rank on the CPU)")
    gpus, deciding = roles[0].gpus, " and ".join(dict.fromkeys(r.gpus_setting for r in roles))
    if t.device != "auto" and (t.device == "cuda") != (gpus == 1):
        wanted = " and ".join(f"{s}={1 if t.device == 'cuda' else 0}" for s in dict.fromkeys(
            r.gpus_setting for r in roles))
        raise ConfigError("train.device", t.device,
                          f"Ray strategies place each rank by {deciding} (here {gpus:g}), which "
                          f"disagrees; use train.device=auto (follow {deciding}) or set {wanted}")


def _one_whole_gpu(setting: str, gpus: float) -> None:
    """One actor's GPUs: 0 or 1 (see :func:`validate_device`)."""
    if 0 < gpus < 1:
        raise ConfigError(setting, gpus,
                          "a fraction of a GPU would put several ranks of one NCCL communicator on one GPU, which "
                          f"NCCL refuses; use {setting}=1 (one GPU per actor) or 0 (CPU, gloo)")
    if gpus not in (0, 1):
        raise ConfigError(setting, gpus,
                          "must be 0 (CPU, gloo) or 1 (one GPU per actor, NCCL): each rank computes on one "
                          "device, so more GPUs per actor would be reserved and stay idle; for more GPUs use more "
                          "actors (parallel.num_actors, or parallel.num_coordinators/num_expert_actors)")


def validate_tokenizer(cfg: Config) -> None:
    """``data.tokenizer`` and ``data.vocab_size``; a tokenizer.json is loaded here, so a bad one stops the start.

    A BPE's vocabulary lies between the byte alphabet plus the end-of-document token and the
    largest embedding a model takes (:data:`~moe_trainer.data.tokenizer.MAX_VOCAB`, which also
    bounds the ids of a tokenizer.json). A token cache directory given where its root belongs
    is refused with the tokenizer it was made with. Nothing of ``moe_trainer.data`` (which needs
    ``datasets``) is imported for the byte tokenizer without a token cache: torch-only tools
    such as gpu_check validate configs too.
    """
    d = cfg.data
    if d.tokenizer == "bpe":  # trained after validation, by the driver
        from moe_trainer.data.bpe import MIN_VOCAB
        from moe_trainer.data.tokenizer import MAX_VOCAB

        if d.vocab_size is not None and not MIN_VOCAB <= d.vocab_size <= MAX_VOCAB:
            raise ConfigError("data.vocab_size", d.vocab_size, f"must be between {MIN_VOCAB} (the 256 byte values "
                              f"and the end-of-document token) and {MAX_VOCAB:,} (the largest embedding a model of "
                              "this trainer takes)")
    elif d.vocab_size is not None:
        raise ConfigError("data.vocab_size", d.vocab_size, "sizes only a BPE this run trains (data.tokenizer=bpe); "
                          f"data.tokenizer={d.tokenizer} has a vocabulary of its own: leave data.vocab_size unset "
                          "(null)")
    if d.tokenizer not in ("byte", "bpe") or d.token_cache:
        from moe_trainer.data.tokenizer import build_tokenizer

        tokenizer = None if d.tokenizer == "bpe" else build_tokenizer(d.tokenizer)  # loads and checks a file
        if d.token_cache:
            from moe_trainer.data.shards import refuse_shard_directory

            refuse_shard_directory(Path(d.token_cache), tokenizer)


def validate_data(cfg: Config) -> None:
    d = cfg.data
    validate_tokenizer(cfg)
    _one_of("data.format", d.format, DATA_FORMATS)
    _positive("data.seq_len", d.seq_len)
    if d.seq_len > cfg.model.max_seq_len:
        raise ConfigError("data.seq_len", d.seq_len, f"must be <= model.max_seq_len={cfg.model.max_seq_len}")
    if not 0 < d.val_fraction < 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "must be strictly between 0 and 1")
    _positive("data.embedded_max_bytes", d.embedded_max_bytes)
    if d.tokenize_procs < 0:
        raise ConfigError("data.tokenize_procs", d.tokenize_procs, "must be >= 0 (0 = min(4, cores))")
    if d.paths and d.hub_name:
        raise ConfigError("data.hub_name", d.hub_name, "set either data.paths or data.hub_name, not both")
    if d.streaming and not d.token_cache:
        raise ConfigError("data.streaming", True, "a streamed corpus is tokenised into the token cache as it is "
                          "read; set data.token_cache (e.g. ~/.cache/moe-trainer/tokens) or data.streaming=false")
    if d.streaming and d.tokenizer == "bpe":
        raise ConfigError("data.streaming", True, "a BPE is trained on the whole training split, which a stream "
                          "does not hold; train one on a sample (moe-prepare-data data.tokenizer=bpe on a subset) "
                          "and give its tokenizer.json as data.tokenizer, or data.streaming=false")
    if d.paths:
        # the loader's own expansion, so what passes here is what it reads; imported here because
        # moe_trainer.data imports `datasets`, which torch-only users of this module (gpu_check) lack
        from moe_trainer.data.paths import expand_data_paths, resolve_format

        resolve_format(expand_data_paths(list(d.paths)), d.format)


def validate_train(cfg: Config) -> None:
    t = cfg.train
    _positive("train.max_steps", t.max_steps)
    _positive("train.batch_size", t.batch_size)
    _positive("train.lr", t.lr)
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.min_lr_ratio", t.min_lr_ratio, "must be between 0 and 1")
    _positive("train.warmup_steps", t.warmup_steps, allow_zero=True)
    _positive("train.expert_lr_scale", t.expert_lr_scale)
    _positive("train.router_lr_scale", t.router_lr_scale)
    _positive("train.weight_decay", t.weight_decay, allow_zero=True)
    for name in ("beta1", "beta2"):
        value = getattr(t, name)
        if not 0 <= value < 1:
            raise ConfigError(f"train.{name}", value, "must be in [0, 1)")
    _positive("train.grad_clip", t.grad_clip, allow_zero=True)
    for name in ("eval_every", "eval_batches", "log_every"):
        _positive(f"train.{name}", getattr(t, name))
    _positive("train.checkpoint_every", t.checkpoint_every, allow_zero=True)
    _positive("train.keep_last", t.keep_last, allow_zero=True)
    _one_of("train.on_nan", t.on_nan, NAN_POLICIES)
    if t.max_skipped_steps < 1:
        raise ConfigError("train.max_skipped_steps", t.max_skipped_steps,
                          "must be >= 1: a run whose every step is skipped must stop (1 = stop at the first "
                          "skipped step, like train.on_nan=stop)")
    _one_of("train.precision", t.precision, PRECISIONS)
    _one_of("train.recompute", t.recompute, RECOMPUTE_MODES)
    _one_of("train.device", t.device, DEVICES)
    _positive("train.grad_accum_steps", t.grad_accum_steps)
    _positive("fault_tolerance.max_restarts", cfg.fault_tolerance.max_restarts, allow_zero=True)
    _positive("fault_tolerance.preempt_timeout_s", cfg.fault_tolerance.preempt_timeout_s)


def validate_batch_split(cfg: Config) -> None:
    """The global batch splits into whole sequences: ranks x accumulation steps x micro-batches x groups.

    Runs after the parallel and train checks, so every divisor here is known to be positive.
    """
    dp_world, micro = data_parallel_ranks(cfg), micro_batches(cfg)
    ranks = {"single": "parallel.strategy=single", "disaggregated": "parallel.num_coordinators"}.get(
        cfg.parallel.strategy, "parallel.num_actors")
    if cfg.train.batch_size % dp_world:
        raise refusal(cfg, "train.batch_size", cfg.train.batch_size,
                      f"must be divisible by the {dp_world} data-parallel ranks ({ranks}={dp_world}), so every "
                      "rank trains on whole sequences",
                      [{"train.batch_size": b} for b in nearest_multiples(cfg.train.batch_size, batch_unit(cfg))])
    accum = cfg.train.grad_accum_steps
    per_step = f"train.batch_size={cfg.train.batch_size} / {ranks}={dp_world}"
    if (cfg.train.batch_size // dp_world) % accum:
        raise ConfigError("train.grad_accum_steps", accum,
                          f"must divide the {cfg.train.batch_size // dp_world} sequences each rank gets per step "
                          f"({per_step}), so every accumulation step runs whole sequences")
    per_forward = per_step + (f" / train.grad_accum_steps={accum}" if accum > 1 else "")
    if sequences_per_forward(cfg) % micro:
        raise ConfigError("parallel.micro_batches", micro,
                          f"must divide the {sequences_per_forward(cfg)} sequences each rank runs per "
                          f"{'forward' if accum > 1 else 'step'} ({per_forward})")
    rows = sequences_per_micro_batch(cfg)
    if cfg.moe.group_sequences is not None and rows % cfg.moe.group_sequences:
        raise refusal(cfg, "moe.group_sequences", cfg.moe.group_sequences,
                      f"must divide the {rows} sequences of each micro-batch ({per_forward} / "
                      f"parallel.micro_batches={micro}), so every layout routes the same groups",
                      [{"moe.group_sequences": 1}])


def validate_logger(cfg: Config) -> None:
    _one_of("logger.mode", cfg.logger.mode, LOGGER_MODES)
    if cfg.logger.timeline_every < 0:
        raise ConfigError("logger.timeline_every", cfg.logger.timeline_every,
                          "must be >= 0: 0 records no step timelines, N records step 2 and every N-th step; "
                          "use logger.timeline_every=0 to turn them off")
    _positive("cluster.connect_timeout_s", cfg.cluster.connect_timeout_s)
    _positive("cluster.wait_for_resources_s", cfg.cluster.wait_for_resources_s, allow_zero=True)
    if not 0 < cfg.logger.collapse_share < 1:
        raise ConfigError("logger.collapse_share", cfg.logger.collapse_share, "must be between 0 and 1 (exclusive): "
                          "the fraction of its fair share of tokens under which an expert counts as collapsing")
    if cfg.logger.collapse_steps < 0:
        raise ConfigError("logger.collapse_steps", cfg.logger.collapse_steps, "must be >= 0: steps in a row under "
                          "logger.collapse_share before an expert is reported; 0 turns the report off")


def validate_memory(cfg: Config) -> None:
    """The memory plan fits each rank's memory (:mod:`moe_trainer.plan`); last, as the plan needs a valid layout."""
    from moe_trainer.plan.budget import check_fits  # the plan builds the model on the meta device: torch

    check_fits(cfg)


def validate_init_from(cfg: Config) -> None:
    """``train.init_from``: the checkpoint's architecture, the settings its shapes fix, its tokenizer, its tensors.

    Not with ``train.resume=PATH``, which wins over it (``auto`` may find nothing and start from it).
    """
    if cfg.train.init_from and cfg.train.resume in (None, "auto"):
        from moe_trainer.hub.init_from import check_init_from  # reads config.json and safetensors headers

        check_init_from(cfg)


def validate_settings(cfg: Config) -> None:
    """Every check but the memory plan's (``moe-train --plan`` prints the plan of a config that passes these)."""
    for check in (validate_model, validate_moe, validate_parallel, validate_data, validate_train, validate_batch_split,
                  validate_device, validate_logger, validate_init_from):
        check(cfg)


def validate(cfg: Config) -> None:
    """Raises the first :class:`ConfigError` found; returns silently when the config is usable."""
    validate_settings(cfg)
    validate_memory(cfg)
