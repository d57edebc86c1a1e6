"""The comparison table: one row per run, written as Markdown and as a standalone HTML page.

Numbers are computed here from the raw records rather than copied from ``summary.json`` so
that every run is measured the same way, including runs that crashed before writing a summary.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moe_trainer.report.load import Run

WARMUP_FRACTION = 0.2  # the first steps pay for compilation, allocation and Ray start-up, not for the strategy
NAN = float("nan")


@dataclass(frozen=True)
class RunStats:
    """The numbers of one table row; NaN (or None) where a run has no data for a column."""

    label: str
    strategy: str
    path: Path
    steps: int
    processes: int | None
    params_total: int | None
    params_active: int | None
    tokens_per_s: float  # steady-state mean
    comm_share: float  # steady-state mean; 0 where the strategy logs no communication
    load_imbalance: float  # mean over all logged steps of max/mean tokens per expert
    dropped_frac: float  # mean over all logged steps
    final_loss: float
    final_val_loss: float
    too_short: str | None = None  # "only N logged steps, too short for a curve" (see Run.too_short)


def steady_state(records: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """The records after the first ``WARMUP_FRACTION`` of them (never empty if ``records`` is not)."""
    return records[int(len(records) * WARMUP_FRACTION):]


def _mean(records: Sequence[dict[str, Any]], key: str, default: float | None = None) -> float:
    values = [r.get(key, default) for r in records]
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return sum(numbers) / len(numbers) if numbers else NAN


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def run_stats(run: Run) -> RunStats:
    """Computes a run's row; the losses are the last records written, falling back to summary.json."""
    steady = steady_state(run.train)
    summary = run.summary
    final_loss = run.train[-1]["loss"] if run.train else summary.get("final_loss", NAN)
    final_val = run.evals[-1]["val_loss"] if run.evals else summary.get("final_val_loss", NAN)
    return RunStats(
        label=run.label,
        strategy=run.strategy,
        path=run.path,
        steps=int(run.train[-1]["step"]) if run.train else int(summary.get("steps", 0)),
        processes=_int_or_none(summary.get("processes")),
        params_total=_int_or_none(summary.get("params_total")),
        params_active=_int_or_none(summary.get("params_active")),
        tokens_per_s=_mean(steady, "tokens_per_s"),
        comm_share=_mean(steady, "comm_share", default=0.0),
        load_imbalance=_mean(run.train, "load_imbalance"),
        dropped_frac=_mean(run.train, "dropped_frac"),
        final_loss=float(final_loss),
        final_val_loss=float(final_val),
        too_short=run.too_short,
    )


def _count(n: int | None) -> str:
    """``49632`` -> ``49.6K``: parameter counts span 5 to 12 digits; three significant ones compare fine."""
    if n is None:
        return "–"
    for scale, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def _num(x: float, fmt: str) -> str:
    return "–" if math.isnan(x) else format(x, fmt)


COLUMNS = ("run", "strategy", "processes", "steps", "params total", "params active", "tokens/s",
           "comm share", "max/mean load", "dropped frac", "final train loss", "final val loss")


def format_row(s: RunStats) -> list[str]:
    """The row's cells, in ``COLUMNS`` order."""
    return [s.label, s.strategy, "–" if s.processes is None else str(s.processes), str(s.steps),
            _count(s.params_total), _count(s.params_active), _num(s.tokens_per_s, ",.0f"),
            _num(s.comm_share * 100, ".1f") + ("%" if not math.isnan(s.comm_share) else ""),
            _num(s.load_imbalance, ".3f"), _num(s.dropped_frac, ".4f"), _num(s.final_loss, ".4f"),
            _num(s.final_val_loss, ".4f")]


NOTES = (
    f"tokens/s and comm share: mean over steady-state steps (the first {WARMUP_FRACTION:.0%} of logged steps "
    "skipped); comm share counts all-to-all and gradient sync time, 0 where a strategy logs none.",
    "max/mean load: tokens on the busiest expert over the mean, averaged over MoE layers, then over all "
    "logged steps (1.0 is perfect balance); dropped frac: share of token-expert assignments over capacity.",
    "Final losses are the last train and validation records in metrics.jsonl.",
)


def notes(stats: Sequence[RunStats]) -> list[str]:
    """What the columns mean, then one note per run too short for its figures to show a curve."""
    short = [f"{s.label}: {s.too_short}; its figures show points, and its tokens/s includes warm-up steps"
             for s in stats if s.too_short]
    return [*NOTES, *short]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_markdown(stats: Sequence[RunStats], figures: Sequence[tuple[str, str]], path: Path,
                   sections: Sequence[str] = ()) -> None:
    """``summary.md``: the table, what the columns mean, further ``sections`` (Markdown), the run dirs, then
    each figure inline."""
    lines = ["# MoE run comparison", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_md_cell(c) for c in format_row(s)) + " |" for s in stats]
    lines += ["", *(f"- {note}" for note in notes(stats)), "", *sections, "## Runs", ""]
    lines += [f"- **{_md_cell(s.label)}**: `{s.path}`" for s in stats]
    lines += ["", "## Figures", ""]
    for file_name, title in figures:
        lines += [f"### {title}", "", f"![{title}]({file_name})", ""]
    path.write_text("\n".join(lines))


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f0f0f0}td{text-align:right}td:first-child,td:nth-child(2){text-align:left}
tr:nth-child(even){background:#fafafa}img{max-width:100%;border:1px solid #eee}
figure{display:inline-block;margin:1em;vertical-align:top;max-width:720px}figcaption{font-weight:600}"""


def write_html(stats: Sequence[RunStats], figures: Sequence[tuple[str, str]], path: Path) -> None:
    """``summary.html``: the same table with inline CSS and the PNGs beside it, no scripts or network."""
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in COLUMNS)
    rows = "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in format_row(s)) + "</tr>" for s in stats)
    items = "".join(f"<li>{esc(n)}</li>" for n in notes(stats))
    run_list = "".join(f"<li><b>{esc(s.label)}</b>: <code>{esc(str(s.path))}</code></li>" for s in stats)
    figs = "\n".join(f'<figure><figcaption>{esc(title)}</figcaption><a href="{esc(name)}">'
                     f'<img src="{esc(name)}" alt="{esc(title)}"></a></figure>' for name, title in figures)
    path.write_text(f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>MoE run comparison</title><style>{_CSS}</style></head>
<body><h1>MoE run comparison</h1>
<table><thead><tr>{head}</tr></thead><tbody>
{rows}
</tbody></table>
<ul>{items}</ul><h2>Runs</h2><ul>{run_list}</ul><h2>Figures</h2>
{figs}
</body></html>
""")
