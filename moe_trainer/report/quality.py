"""MoE against its dense baseline: loss per step, per token and per training FLOP, and how soon MoE gets there.

Written by ``moe-report`` when its runs include a ``model=dense`` run and ``model=moe`` runs
(``moe-train -m experiment=moe_vs_dense``). The headline number is computed, not read off a
plot: the step at which each MoE run's validation loss first reaches the dense run's final
validation loss, linearly interpolated between its evaluations, as a fraction of the dense
run's steps (Switch Transformer's "time to quality").

Training FLOPs per token are ``6 * active parameters`` (forward and backward through every
weight a token uses, Kaplan et al. 2020) plus ``12 * layers * seq_len * d_model`` for the
attention scores and their use (no causal halving), so MoE runs of equal active parameters
share an x axis with the dense run: their total parameters grow, their FLOPs per token do not.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.report.load import Run
from moe_trainer.report.plots import _new_axes, _style, save_figure


def is_dense(run: Run) -> bool:
    return run.setting("model", "arch") == "dense"


def tokens_per_step(run: Run) -> int:
    return int(run.setting("train", "batch_size", 0)) * int(run.setting("data", "seq_len", 0))


def flops_per_token(run: Run) -> float:
    """Training FLOPs per token: 6 x active parameters + attention (see the module docstring)."""
    active = run.summary.get("params_active") or 0
    attention = (12 * run.setting("model", "n_layers", 0) * run.setting("data", "seq_len", 0)
                 * run.setting("model", "d_model", 0))
    return 6.0 * float(active) + float(attention)


def baseline(runs: Sequence[Run]) -> Run:
    """The dense run the others are measured against: the one with the most steps (the first of those)."""
    dense = [r for r in runs if is_dense(r) and r.evals]
    return max(dense, key=lambda r: int(r.evals[-1]["step"]))


def reach_step(evals: Sequence[dict[str, Any]], target: float) -> float | None:
    """The first step at which ``val_loss`` reaches ``target``, interpolated between evaluations; None if never."""
    previous: dict[str, Any] | None = None
    for record in evals:
        loss = float(record["val_loss"])
        if loss <= target:
            if previous is None:
                return float(record["step"])
            before = float(previous["val_loss"])
            frac = (before - target) / (before - loss) if before > loss else 1.0
            return float(previous["step"]) + frac * (float(record["step"]) - float(previous["step"]))
        previous = record
    return None


def _second_half_layers(run: Run) -> list[list[dict[str, Any]]]:
    """Per MoE layer: that layer's record in each logged step of the run's second half."""
    half = run.train[len(run.train) // 2:]
    layers = max((len(r.get("layers") or []) for r in half), default=0)
    return [[r["layers"][i] for r in half if len(r.get("layers") or []) > i] for i in range(layers)]


def second_half_balance(run: Run) -> list[float]:
    """Per MoE layer: max/mean expert load averaged over the second half of the logged steps."""
    out = []
    for records in _second_half_layers(run):
        values = [r["max_mean"] for r in records]
        out.append(sum(values) / len(values) if values else math.nan)
    return out


def second_half_pooled_balance(run: Run) -> list[float]:
    """Per MoE layer: max/mean of the load summed over the second half's logged steps.

    The per-step figure (:func:`second_half_balance`) has a part that persists from step to step (a
    router or bias that favours some experts for long) and a part that changes from step to step: each
    batch's own mix of tokens, and the bias's or router's own swings. Pooled over many steps the second
    part averages out, so a pooled value near 1 under a per-step value well above it says that little
    persists; which of the changing parts dominates, it cannot tell.
    """
    out = []
    for records in _second_half_layers(run):
        loads = [r["tokens_per_expert"] for r in records if r.get("tokens_per_expert")]
        if not loads:
            out.append(math.nan)
            continue
        pooled = [sum(column) for column in zip(*loads, strict=True)]
        out.append(max(pooled) / max(sum(pooled) / len(pooled), 1e-12))
    return out


@dataclass(frozen=True)
class QualityRow:
    label: str
    dense: bool  # the baseline run (the longest dense run)
    params_active: int | None
    params_total: int | None
    steps: int
    final_val_loss: float
    reach_step: float | None  # first step at the dense run's final val_loss (None: never, or the dense run itself)
    reach_fraction: float | None  # reach_step / the dense run's steps
    balance: list[float]  # per layer, second half: mean max/mean load
    pooled: list[float]  # per layer: max/mean of the second half's summed load


def quality_rows(runs: Sequence[Run]) -> list[QualityRow]:
    """One row per run against the baseline (the longest dense run); empty without a dense and an MoE run.

    Shorter runs, dense or MoE, are rows too: a run of fewer steps has a learning rate schedule
    of its own that ends at its last step, so its final loss is that of a model trained for
    that budget, which a longer run's loss at the same step (its learning rate still high) is not.
    """
    dense = [r for r in runs if is_dense(r) and r.evals]
    moe = [r for r in runs if not is_dense(r) and r.evals]
    if not dense or not moe:
        return []
    base = baseline(runs)
    target, base_steps = float(base.evals[-1]["val_loss"]), int(base.evals[-1]["step"])
    rows = []
    for run in [base, *(r for r in dense if r is not base), *moe]:
        reach = None if run is base else reach_step(run.evals, target)
        rows.append(QualityRow(run.label, run is base, run.summary.get("params_active"),
                               run.summary.get("params_total"), int(run.evals[-1]["step"]),
                               float(run.evals[-1]["val_loss"]), reach,
                               None if reach is None else reach / base_steps, second_half_balance(run),
                               second_half_pooled_balance(run)))
    return rows


def _millions(n: int | None) -> str:
    return "?" if n is None else f"{n / 1e6:.2f}M"


def legend(run: Run) -> str:
    return (f"{run.label} (active {_millions(run.summary.get('params_active'))}, "
            f"total {_millions(run.summary.get('params_total'))})")


def write_quality_plots(runs: Sequence[Run], out: Path) -> list[tuple[str, str]]:
    """val_loss against steps, tokens and training FLOPs, one curve per run; none without dense and MoE runs."""
    if not quality_rows(runs):
        return []
    figures = []
    axes = (("steps", "step", lambda r, s: s), ("tokens", "tokens seen", lambda r, s: s * tokens_per_step(r)),
            ("flops", "training FLOPs", lambda r, s: s * tokens_per_step(r) * flops_per_token(r)))
    for name, xlabel, x_of in axes:
        fig, ax = _new_axes(f"Validation loss against {xlabel}: MoE vs dense", xlabel, "val_loss", len(runs))
        for i, run in enumerate(runs):
            steps = [int(e["step"]) for e in run.evals]
            ax.plot([x_of(run, s) for s in steps], [float(e["val_loss"]) for e in run.evals], label=legend(run),
                    **_style(i))
        dense = baseline(runs)
        ax.axhline(float(dense.evals[-1]["val_loss"]), color="black", linewidth=0.8, linestyle=":",
                   label="dense final val_loss")
        late = [float(e["val_loss"]) for e in dense.evals if int(e["step"]) >= 0.1 * int(dense.evals[-1]["step"])]
        ax.set_ylim(top=max(late, default=ax.get_ylim()[1]))  # the first tenth (loss 5.6 -> 2) would flatten the rest
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, fontsize=8)
        file = f"val_loss_vs_{name}.png"
        save_figure(fig, out / file)
        figures.append((file, f"Validation loss against {xlabel}"))
    return figures


def quality_markdown(rows: Sequence[QualityRow]) -> str:
    """The MoE-vs-dense table (empty string without rows)."""
    if not rows:
        return ""
    lines = ["## MoE vs dense", "",
             "Steps to reach the dense run's final val_loss, interpolated between evaluations "
             "(fraction: of the dense run's steps); balance: max/mean expert load per MoE layer, "
             "averaged over the second half of the logged steps; pooled: max/mean of the load summed over "
             "those steps (the part that persists across steps).", "",
             "| run | active params | total params | final val_loss | steps to dense's final | fraction | "
             "max/mean per layer (2nd half) | pooled |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        reach = "baseline" if row.dense else "never" if row.reach_step is None else f"{row.reach_step:.0f}"
        frac = "" if row.reach_fraction is None else f"{row.reach_fraction:.0%}"
        balance = ", ".join(f"{b:.3f}" for b in row.balance)
        pooled = ", ".join(f"{b:.3f}" for b in row.pooled)
        lines.append(f"| {row.label} | {_millions(row.params_active)} | {_millions(row.params_total)} | "
                     f"{row.final_val_loss:.4f} | {reach} | {frac} | {balance} | {pooled} |")
    return "\n".join(lines) + "\n"
