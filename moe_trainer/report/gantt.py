"""Gantt charts of step timelines: what each rank did, and when, during one sampled step.

The input is a run's ``timelines/step_NNNNNN.json`` (Chrome trace, written by the driver:
:mod:`moe_trainer.timeline`). One row per rank and lane (a lane holds regions that never
overlap; what runs inside a forward pass, such as its transfers, sits one lane down), bars
coloured by category, x in milliseconds from the step's first event.

Charts of several runs are meant to be read side by side (``expert_parallel`` beside
``disaggregated``), so by default they share one x axis, the longest of their steps: the
same length of bar is the same time in every chart. ``--timeline-scale own`` fits each chart
to its own step instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Patch

from moe_trainer.report.load import Run
from moe_trainer.report.plots import save_figure
from moe_trainer.timeline import CATEGORIES

SCALES = ("shared", "own")
COLORS = {"compute": "tab:blue", "transfer": "tab:orange", "wait": "silver", "optimizer": "tab:green",
          "sync": "tab:red"}
MIN_BAR = 0.002  # of the x range: a region of a few microseconds still shows, as a sliver
LABEL_MIN = 0.07  # of the x range: bars at least this wide carry their region's name


@dataclass
class StepTrace:
    """One step's events of every rank, as read from its trace file (times in ms from the step's start)."""

    path: Path
    step: int
    strategy: str
    bars: list[dict[str, Any]]  # {"name", "cat", "start_ms", "dur_ms", "pid", "tid"}
    process_names: dict[int, str] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max((b["start_ms"] + b["dur_ms"] for b in self.bars), default=0.0)

    @property
    def rows(self) -> list[tuple[int, int]]:
        """``(rank, lane)`` of every row, rank 0 first."""
        return sorted({(b["pid"], b["tid"]) for b in self.bars})


def read_trace(path: Path, step: int = -1) -> StepTrace | None:
    """Parses a trace file (``step``: its step when the file does not say); None when unreadable or empty."""
    try:
        data = json.loads(path.read_text())
        events = data["traceEvents"] if isinstance(data, dict) else data
        meta = data.get("metadata", {}) if isinstance(data, dict) else {}
        bars = [{"name": str(e.get("name", "")), "cat": str(e.get("cat", "")), "start_ms": float(e["ts"]) / 1e3,
                 "dur_ms": float(e.get("dur", 0.0)) / 1e3, "pid": int(e["pid"]), "tid": int(e.get("tid", 0))}
                for e in events if e.get("ph") == "X"]
        names = {int(e["pid"]): str(e["args"]["name"]) for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not bars:
        return None
    t0 = min(b["start_ms"] for b in bars)  # the driver writes 0-based traces; others may not be
    for b in bars:
        b["start_ms"] -= t0
    said = meta.get("step")
    return StepTrace(path, said if isinstance(said, int) else step, str(meta.get("strategy", "unknown")), bars, names)


def gantt_figure(trace: StepTrace, title: str, x_max_ms: float | None = None) -> Figure:
    """The Gantt chart of one step: a row per rank and lane, bars by category, legend of every category."""
    rows = trace.rows
    x_max = max(x_max_ms or 0.0, trace.duration_ms) * 1.02 or 1.0
    fig = Figure(figsize=(10, 1.9 + 0.32 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    y_of = {row: i for i, row in enumerate(rows)}
    cells: dict[tuple[int, str], list[tuple[float, float]]] = {}
    for bar in trace.bars:
        width = max(bar["dur_ms"], MIN_BAR * x_max)
        cells.setdefault((y_of[(bar["pid"], bar["tid"])], bar["cat"]), []).append((bar["start_ms"], width))
        if bar["dur_ms"] >= LABEL_MIN * x_max:
            ax.text(bar["start_ms"] + bar["dur_ms"] / 2, y_of[(bar["pid"], bar["tid"])], bar["name"], ha="center",
                    va="center", fontsize="x-small", color="black" if bar["cat"] == "wait" else "white",
                    clip_on=True)
    for (y, cat), spans in cells.items():
        # a thin white edge: back-to-back regions of one category (forward, backward) stay apart
        ax.broken_barh(spans, (y - 0.4, 0.8), facecolors=COLORS.get(cat, "black"), edgecolor="white", linewidth=0.4)
    labels = [trace.process_names.get(pid, f"rank {pid}") if lane == 0 else f"lane {lane}" for pid, lane in rows]
    ax.set_yticks(range(len(rows)), labels, fontsize="small")
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:  # a line between ranks
            ax.axhline(i - 0.5, color="gray", linewidth=0.6)
    ax.set_ylim(len(rows) - 0.5, -0.5)  # rank 0 on top
    ax.set_xlim(0, x_max)
    ax.set(title=title, xlabel="time since the step's first region (ms)")
    ax.grid(True, axis="x", alpha=0.3)
    # every category, drawn or not, so charts of different runs share one legend
    handles = [Patch(facecolor=COLORS[cat], label=cat) for cat in CATEGORIES]
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles), fontsize="small", frameon=False)
    return fig


def pick_step(run: Run, step: int | None) -> int | None:
    """``step`` when the run has its timeline, else None; without ``step``, the run's newest sampled step."""
    if step is not None:
        return step if step in run.timelines else None
    return max(run.timelines, default=None)


def timeline_traces(runs: Sequence[Run], step: int | None = None) -> list[tuple[Run, StepTrace]]:
    """The trace to draw for each run that has one (the chosen ``step``, or its newest)."""
    chosen = []
    for run in runs:
        picked = pick_step(run, step)
        trace = read_trace(run.timelines[picked], picked) if picked is not None else None
        if trace is not None:
            chosen.append((run, trace))
    return chosen


def gantt_figures(runs: Sequence[Run], step: int | None = None,
                  scale: str = "shared") -> list[tuple[str, str, Figure]]:
    """``(file name, title, figure)`` of each run's Gantt chart (runs without a timeline of ``step`` get none).

    ``scale``: ``shared`` draws every chart on the x axis of the longest step among them,
    ``own`` fits each to its step.
    """
    if scale not in SCALES:
        raise ValueError(f"timeline scale must be one of {', '.join(SCALES)}, got {scale!r}")
    traces = timeline_traces(runs, step)
    shared = max((t.duration_ms for _, t in traces), default=0.0) if scale == "shared" else None
    figures = []
    for run, trace in traces:
        name = run.label if run.label.startswith(trace.strategy) else f"{run.label} ({trace.strategy})"
        title = f"Step {trace.step} timeline: {name}, {trace.duration_ms:.1f} ms"
        figures.append((f"timeline_{run.slug}_step{trace.step:06d}.png", f"Step timeline: {run.label}, "
                        f"step {trace.step}", gantt_figure(trace, title, shared)))
    return figures


def write_gantts(runs: Sequence[Run], out: Path, step: int | None = None,
                 scale: str = "shared") -> list[tuple[str, str]]:
    """Draws :func:`gantt_figures` into ``out``; returns ``(file name, title)`` pairs, like ``write_plots``."""
    written = []
    for name, title, fig in gantt_figures(runs, step, scale):
        save_figure(fig, out / name)
        written.append((name, title))
    return written
