"""The memory plan as the table ``moe-train ... --plan`` prints: one row per role and rank, MiB."""

from __future__ import annotations

from moe_trainer.config.schema import RECOMPUTE_MODES, Config
from moe_trainer.plan.budget import Budget
from moe_trainer.plan.memory_plan import MemoryPlan, RankPlan

MIB = 2**20


def _ranks(r: RankPlan) -> str:
    return str(r.ranks[0]) if len(r.ranks) == 1 else f"{r.ranks[0]}-{r.ranks[-1]}"


def _experts(r: RankPlan) -> str:
    """Global experts each rank holds: ``0-3`` (one rank), ``0-3|4-7`` (one range per rank)."""
    spans = [f"{first}-{first + count - 1}" if count else "-" for first, count in r.experts]
    unique = list(dict.fromkeys(spans))
    return unique[0] if len(unique) == 1 else "|".join(spans)


def _row(r: RankPlan) -> dict[str, str]:
    def mib(n: int) -> str:
        return f"{n / MIB:,.0f}"

    row = {"rank": _ranks(r), "role": r.role, "experts": _experts(r), "params": mib(r.params), "grads": mib(r.grads),
           "optimizer": mib(r.optimizer)}
    for mode in RECOMPUTE_MODES:
        row[f"act {mode}" + ("*" if mode == r.recompute else "")] = mib(r.activations[mode])
    row.update({"workspace": mib(r.workspace), "comm": mib(r.comm + r.grad_sync), "data": mib(r.data),
                "baseline": mib(r.baseline + r.kernels), "heap": mib(r.heap), "total": mib(r.total)})
    return row


def format_plan(cfg: Config, plan: MemoryPlan, limit: Budget | None) -> str:
    """The table, what it assumed, and the budget it was checked against."""
    unit = "device memory per GPU" if plan.device == "cuda" else "peak resident memory per process"
    lines = [f"memory plan: parallel.strategy={cfg.parallel.strategy}, train.precision={cfg.train.precision}, "
             f"train.recompute={cfg.train.recompute}; MiB of {unit}"]
    rows = [_row(r) for r in plan.ranks]
    columns = list(rows[0])
    widths = [max(len(c), *(len(row[c]) for row in rows)) for c in columns]
    lines.append("  ".join(c.rjust(w) if i > 2 else c.ljust(w) for i, (c, w) in enumerate(zip(columns, widths,
                                                                                            strict=True))))
    for row in rows:
        lines.append("  ".join(row[c].rjust(w) if i > 2 else row[c].ljust(w)
                               for i, (c, w) in enumerate(zip(columns, widths, strict=True))))
    lines.append("* the configured train.recompute, counted in the total. total = baseline + data + params + grads + "
                 "optimizer + activations + workspace + comm (rows in flight, gradient all-reduce buffer) + heap "
                 "(+ bf16 kernels on the CPU)")
    mapped = max(r.data_mapped for r in plan.ranks)
    if mapped:
        lines.append(f"data.token_cache: {mapped / MIB:,.0f} MiB of token files memory-mapped "
                     "(page cache, not counted)")
    lines.extend(f"note: {n}" for n in plan.notes)
    if limit is None:
        lines.append("budget: not known here (an existing cluster, or no GPU visible to the driver); "
                     "set parallel.memory_per_actor_gb to check it")
    else:
        worst = plan.largest()
        verdict = "fits" if worst.total <= limit.bytes else "does NOT fit"
        lines.append(f"budget: {limit.bytes / MIB:,.0f} MiB per process ({limit.source}); the largest rank needs "
                     f"{worst.total / MIB:,.0f} MiB: {verdict}")
    return "\n".join(lines)
