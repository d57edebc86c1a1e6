"""Typed configuration schema, registered with Hydra's ConfigStore.

Every YAML file under ``conf/`` is merged into these dataclasses, so a typo
(``moe.topk=2``) or a wrong type (``moe.top_k=two``) fails when Hydra composes
the config, before anything runs; a key added with ``+`` is refused by
:func:`to_dataclass` (the schema is closed). Each component owns its small slice; values
that can be derived (local experts, routing groups) are derived, not stored.
Range checks that types cannot express live in :mod:`moe_trainer.config.validate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

try:
    from omegaconf import MISSING
except ImportError:  # the torch-only GPU check builds these dataclasses directly; omegaconf's MISSING is this
    MISSING = "???"

STRATEGIES = ("single", "data_parallel", "expert_parallel", "disaggregated")
ROUTER_TYPES = ("topk", "switch", "expert_choice")
SCORE_ORDERS = ("softmax_topk", "topk_softmax")
AUX_LOSS_SCOPES = ("global", "group")
BIAS_UPDATES = ("sign", "proportional")
BIAS_UPDATE_SCHEDULES = ("constant", "lr")
ARCHS = ("moe", "dense")
LOGGER_MODES = ("auto", "online", "offline", "disabled")
DATA_FORMATS = ("auto", "text", "json", "parquet")
PLACEMENTS = ("pack", "spread")
NAN_POLICIES = ("stop", "skip")
PRECISIONS = ("fp32", "bf16")
RECOMPUTE_MODES = ("none", "attention", "block")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    arch: str = "moe"  # moe | dense: dense swaps every MoE FFN for a SwiGLU of equal active width
    d_model: int = 128  # residual stream width
    n_layers: int = 4  # transformer blocks
    n_heads: int = 4  # attention heads; d_model must divide by it
    max_seq_len: int = 256  # longest sequence rotary tables are built for
    ffn_hidden: int = 512  # hidden width of the dense FFN in non-MoE blocks
    rope_theta: float = 10000.0  # rotary base frequency
    norm_eps: float = 1e-5  # RMSNorm epsilon
    init_std: float = 0.02  # std of the normal init of linear and embedding weights


@dataclass
class MoEConfig:
    num_experts: int = 8  # routed experts per MoE layer (Mixtral: 8)
    top_k: int = 2  # experts per token (Mixtral: 2); ignored by switch (1)
    every: int = 1  # the FFN of every `every`-th block is MoE (1 = all blocks)
    first_dense: int = 0  # the first N blocks keep a dense FFN of model.ffn_hidden (DeepSeekMoE's first layer)
    expert_hidden: int = 256  # SwiGLU hidden width of one expert
    router: str = "topk"  # topk | switch | expert_choice
    score_order: str = "softmax_topk"  # softmax_topk (GShard/Switch) | topk_softmax (Mixtral)
    normalize_topk: bool = True  # softmax_topk only: renormalise the k weights to sum to 1
    routed_scale: float = 1.0  # every gate weight times this (DeepSeek's routed_scaling_factor)
    capacity_factor: float | None = None  # null = dropless; else capacity = ceil(cf * tokens * k / E)
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight
    z_loss_coef: float = 0.001  # ST-MoE router z-loss weight
    bias_balancing: bool = False  # DeepSeek-V3 aux-loss-free bias on the selection scores
    bias_update_rate: float = 0.001  # step size of that bias update
    bias_update: str = "sign"  # sign: +-rate (DeepSeek-V3) | proportional: rate x (mean - load) / mean
    bias_update_schedule: str = "constant"  # constant | lr: the rate times the lr's decay after warmup
    # training only: noise of this standard deviation on the scores that select each token's experts
    # (never on gate weights), hashed per token so every layout draws the same; 0 = none
    selection_noise: float = 0.0
    num_shared_experts: int = 0  # DeepSeekMoE shared experts every token passes through
    shared_expert_hidden: int = 256  # hidden width of each shared expert
    aux_loss_scope: str = "global"  # global: f_i, P_i over the whole global batch | group: per routing group
    group_sequences: int | None = 1  # sequences per routing group (capacity, expert choice); null = one per rank


def is_moe_block(index: int, moe_cfg: MoEConfig) -> bool:
    """Block ``index`` (0-based) has an MoE FFN when it is past ``moe.first_dense`` and ``(index + 1) % every == 0``.

    ``moe.first_dense`` keeps the first blocks dense as DeepSeekMoE does, whose first layer's load
    balance converged slowest: there a token is still little more than its own embedding, so a
    frequent token takes the same experts wherever it stands. Here (docs/moe-study.md, fifth
    session) the first MoE layer after a dense block balanced no better, so the default is 0.
    """
    return index >= moe_cfg.first_dense and (index + 1) % moe_cfg.every == 0


def experts_per_token(moe: MoEConfig) -> int:
    """k: the experts each token goes to (Switch routing is top-1 whatever ``moe.top_k`` says)."""
    return 1 if moe.router == "switch" else moe.top_k


@dataclass
class ParallelConfig:
    strategy: str = "single"  # single | data_parallel | expert_parallel | disaggregated
    num_actors: int = 1  # Ray actors (data_parallel, expert_parallel)
    ep_size: int | None = None  # expert-parallel size; null = num_actors
    gpus_per_actor: float = 0.0  # 0 = CPU/gloo; 1 = one GPU per actor, NCCL
    cpus_per_actor: float = 1.0  # CPUs reserved per actor in the placement group
    num_coordinators: int = 1  # disaggregated: actors running attention
    num_expert_actors: int = 2  # disaggregated: actors holding only experts
    # disaggregated: each role sized on its own (coordinators run attention over every token, expert
    # actors only expert FFNs); null = parallel.cpus_per_actor / gpus_per_actor. Both roles use GPUs or neither
    cpus_per_coordinator: float | None = None  # CPUs per coordinator; null = parallel.cpus_per_actor
    cpus_per_expert_actor: float | None = None  # CPUs per expert actor; null = parallel.cpus_per_actor
    gpus_per_coordinator: float | None = None  # 0 or 1 GPU per coordinator; null = parallel.gpus_per_actor
    gpus_per_expert_actor: float | None = None  # 0 or 1 GPU per expert actor; null = parallel.gpus_per_actor
    micro_batches: int = 1  # disaggregated: pipeline depth; expert_parallel: micro-batches overlapping all-to-alls
    a2a_chunks: int = 1  # expert_parallel: chunks of local experts whose all-to-alls overlap expert compute; 1 = off
    placement: str = "pack"  # pack | spread: how the placement group lays actors over nodes
    timeout_s: float = 300.0  # every collective (and the rendezvous) fails after this long
    # ZeRO-1: AdamW state of dense parameters sharded over the data-parallel ranks, of experts over their
    # expert-data-parallel group; each owner broadcasts its updated parameters. Same losses, less memory
    shard_optimizer: bool = False
    # GiB each rank may use (host memory on the CPU, device memory on a GPU): validation refuses a config whose
    # memory plan exceeds it; null = the GPU's memory, or on the CPU this machine's memory / processes started on it
    memory_per_actor_gb: float | None = None


@dataclass
class ClusterConfig:
    address: str | None = None  # null = RAY_ADDRESS or a fresh embedded local Ray on 127.0.0.1
    connect_timeout_s: float = 30.0  # give up connecting to a cluster after this long
    # an existing cluster too small for the job (an autoscaling one, or one that lost a node): wait this long for
    # it to grow before refusing; 0 = refuse at once. The embedded Ray never grows: it is never waited for
    wait_for_resources_s: float = 0.0


def cache_root() -> str:
    """``$MOE_TRAINER_CACHE``, else ``~/.cache/moe-trainer``: where runs share token shards, BPEs, measurements."""
    return os.environ.get("MOE_TRAINER_CACHE") or "~/.cache/moe-trainer"


def default_token_cache() -> str:
    """``data.token_cache``'s default (the Hydra configs read the same variable, conf/data/*.yaml)."""
    return f"{cache_root()}/tokens"


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # local files, globs or directories; empty = embedded corpus
    format: str = "auto"  # auto (by extension) | text | json | parquet
    text_field: str = "text"  # column holding the text in json/parquet/hub data
    hub_name: str | None = None  # a Hugging Face Hub dataset name (needs network)
    hub_config: str | None = None  # its configuration name, if any
    tokenizer: str = "byte"  # byte (256 byte values + end-of-document) | bpe (trained here) | path of a tokenizer.json
    vocab_size: int | None = None  # bpe only: ids of the trained vocabulary, end-of-document included; null = 8192
    seq_len: int = 128  # tokens per training sequence
    val_fraction: float = 0.05  # share of documents held out for validation
    embedded_max_bytes: int = 4_000_000  # size cap of the embedded stdlib corpus
    # memory-mapped token shards, written once and shared by runs; null = tokenise into memory
    token_cache: str | None = field(default_factory=default_token_cache)
    streaming: bool = False  # read the source as a datasets stream straight into the token cache (no Arrow copy)
    tokenize_procs: int = 0  # processes tokenising into the token cache; 0 = min(4, cores)


@dataclass
class TrainConfig:
    max_steps: int = 300  # optimizer steps
    batch_size: int = 16  # global batch in sequences (split across data-parallel ranks)
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 30  # linear warmup steps
    expert_lr_scale: float = 1.0  # routed experts' learning rate = lr x this (each expert sees k/E of the tokens)
    router_lr_scale: float = 1.0  # routers' learning rate = lr x this (how fast routing moves against the bias step)
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW first-moment decay
    beta2: float = 0.95  # AdamW second-moment decay
    grad_clip: float = 1.0  # global gradient-norm clip; 0 disables
    seed: int = 0  # seeds init and data order
    eval_every: int = 50  # evaluate every N steps (and at step 0 and the end)
    eval_batches: int = 8  # validation batches per evaluation
    log_every: int = 10  # metrics record every N steps
    checkpoint_every: int = 100  # save every N steps (and at the end); 0 = only at the end
    resume: str | None = None  # null | auto (latest in this run dir) | path to a checkpoint or run dir
    init_from: str | None = None  # a local transformers model directory to start from (docs/user-guide.md)
    keep_last: int = 3  # checkpoints kept on disk (older ones deleted after a successful save); 0 = all
    async_checkpoint: bool = False  # write checkpoint files in the background while training goes on
    on_nan: str = "stop"  # stop | skip: what a non-finite loss or gradient does (the step is never applied)
    max_skipped_steps: int = 10  # on_nan=skip: stop after this many skipped steps in a row
    retain_freed_memory: bool = True  # keep freed host memory for reuse instead of re-faulting it each step
    precision: str = "fp32"  # fp32 | bf16: bf16 compute, fp32 master weights, optimizer state, router and losses
    recompute: str = "none"  # none | attention | block: activations recomputed in backward (never an all-to-all)
    grad_accum_steps: int = 1  # forwards per optimizer step; each holds batch_size / grad_accum_steps sequences
    device: str = "auto"  # single: auto (cuda when present) | cpu | cuda; Ray strategies: parallel.gpus_per_actor


@dataclass
class FaultToleranceConfig:
    max_restarts: int = 2  # Ray strategies: rebuild the actor group after a lost actor, this many times
    # after a lost node: continue from the last checkpoint on what the cluster still holds, resharded to the largest
    # valid layout that fits (fewer actors); false = the same layout or stop (checkpoint intact, how to resume said)
    elastic: bool = False
    # SIGTERM (or moe-submit stop): a checkpoint at the next step boundary, then exit 143; forced exit after this long
    preempt_timeout_s: float = 120.0


@dataclass
class LoggerConfig:
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline | disabled
    project: str = "moe-trainer"  # W&B project
    group: str = "default"  # W&B group: the experiment being compared
    tags: list[str] = field(default_factory=list)  # W&B tags
    progress: bool = True  # show a progress bar
    # Per-rank step timeline (RUN_DIR/timelines/step_N.json, Chrome trace) of step 2 and every N-th step; 0 = off.
    # Why 50: a trace is small (the debug model on 2 ranks: 100 events, 14 KB) and resolving it costs ~2 us per
    # region at the step's end (CPU), so one step in 50 is lost in the noise of throughput and disk, while a
    # long run still gets a trace every 50 steps to compare as training settles (step 2: short runs get one).
    timeline_every: int = 50
    # An expert under collapse_share of its fair share of tokens for collapse_steps steps in a row is reported as
    # collapsing (console line, metrics.jsonl event, W&B alert), naming its layer; 0 steps = off
    collapse_share: float = 0.1
    collapse_steps: int = 50


@dataclass
class Config:
    model: ModelConfig = MISSING
    moe: MoEConfig = MISSING
    parallel: ParallelConfig = MISSING
    data: DataConfig = MISSING
    train: TrainConfig = MISSING
    logger: LoggerConfig = MISSING
    cluster: ClusterConfig = MISSING
    fault_tolerance: FaultToleranceConfig = MISSING


def register_configs() -> None:
    """Registers the schema as the base every ``conf/`` file merges into."""
    from hydra.core.config_store import ConfigStore  # here, so the schema imports without Hydra

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)


def to_dataclass(cfg: Any) -> Config:
    """Turns a composed DictConfig into plain typed dataclasses for the code to use.

    Refuses keys the schema lacks first (:func:`~moe_trainer.config.keys.check_known_keys`):
    ``OmegaConf.to_object`` would drop a ``+key`` silently.
    """
    from omegaconf import OmegaConf

    from moe_trainer.config.keys import check_known_keys  # it imports this module

    check_known_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, Config)
    return obj
