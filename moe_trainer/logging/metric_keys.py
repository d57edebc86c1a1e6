"""The W&B keys of a training run: which record key goes to which W&B key, in one place.

``moe_trainer.outputs`` turns each ``metrics.jsonl`` record into W&B keys with these functions,
and the saved W&B workspace (``moe_trainer.report.dashboard``) names its panels' metrics with the
same functions, so the two cannot disagree on a prefix, a per-layer name or a per-rank suffix.
A record key has one home panel (its prefix): ``train/``, ``eval/``, ``balance/``, ``comm/``,
``roles/`` (the disaggregated roles), ``perf/`` or ``events/``.
"""

from __future__ import annotations

TRAIN = ("loss", "aux_loss", "z_loss", "total_loss", "lr", "grad_norm", "tokens")
BALANCE = ("load_imbalance", "load_cv", "load_min_share", "dropped_frac", "router_entropy")
EVENTS = ("restart", "failed_at_step", "restart_time_s", "resumed_from_step", "moe_layer", "block", "expert",
          "expert_share", "below_since_step")
NOT_SCALARS = ("step", "layers", "expert_bias")  # records' structure, not metrics
PER_RANK_LISTS = ("_per_rank", "_per_actor")  # lists of one value per process: metrics.jsonl only
# Every per-rank metric is also logged as its mean over ranks (the plain key), its maximum and the rank
# holding the maximum (``moe_trainer.train.aggregate``): max against mean is how a straggler shows.
RANK_MAX, RANK_ARGMAX = "_max", "_argmax"
# Per MoE layer (``record["layers"][i]``): these statistics, and the tokens per expert as a histogram.
LAYER_STATS = ("max_mean", "cv", "min_share", "dropped_frac", "router_entropy")
LAYER_HISTOGRAM = "tokens_per_expert"
EXPERT_LOAD_TABLE = "balance/expert_load"  # (step, layer, expert, tokens) rows, logged once at the end


def panel(key: str) -> str | None:
    """The W&B panel (key prefix) of a record key; None for keys W&B does not get as scalars."""
    if key.endswith(PER_RANK_LISTS) or key in NOT_SCALARS:
        return None
    if key in EVENTS:
        return "events"
    if key in TRAIN:
        return "train"
    if key == "val_loss":
        return "eval"
    if key in BALANCE or key.startswith("load_imbalance_local"):  # per rank: mean, _max, _argmax
        return "balance"
    if key.startswith(("a2a_", "grad_sync_", "param_sync_", "comm_")):
        return "comm"
    if key.startswith(("coord_", "expert_")):
        return "roles"  # disaggregated only: busy/wait per role
    return "perf"  # tokens_per_s, step_time_s*, mem_rss_mb*, mem_optim_*, coordinator/expert busy and idle times


def wandb_key(key: str) -> str:
    """The W&B key a record key is logged under (``tokens_per_s`` -> ``perf/tokens_per_s``)."""
    group = panel(key)
    if group is None:
        raise ValueError(f"record key {key!r} is not logged to W&B as a scalar")
    return f"{group}/{key}"


def rank_max_key(key: str) -> str:
    """The W&B key of the slowest (largest) rank's value of a per-rank record key."""
    return wandb_key(key + RANK_MAX)


def layer_key(layer: int, stat: str) -> str:
    """The W&B key of one MoE layer's statistic (``balance/layer0/max_mean``) or load histogram."""
    if stat not in (*LAYER_STATS, LAYER_HISTOGRAM, "bias_max_abs"):
        raise ValueError(f"{stat!r} is not a per-layer statistic ({', '.join(LAYER_STATS)}, {LAYER_HISTOGRAM})")
    return f"balance/layer{layer}/{stat}"
