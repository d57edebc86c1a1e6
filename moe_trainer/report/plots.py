"""PNG figures comparing runs, drawn with matplotlib's Agg canvas.

Figures are built with :class:`matplotlib.figure.Figure` on an explicit ``FigureCanvasAgg``
rather than through ``pyplot``: no global backend switch, no figure registry to leak from, so
the report works headless and inside other processes (tests, notebooks) without side effects.

Each run keeps one colour and one line style in every figure. The styles differ on purpose:
strategies are numerically equivalent, so their loss curves lie on top of each other and only
interleaved dashes keep every run visible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from moe_trainer.report.load import Run

DPI = 110
_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:gray",
           "tab:olive", "tab:cyan")
_STYLES = ("-", (0, (5, 2)), (0, (1, 1.5)), (0, (6, 2, 1, 2)))


def _style(i: int, stacked: bool = False) -> dict[str, object]:
    """Colour and dash of run ``i``; ``stacked`` draws later runs thinner, so identical curves show as bands."""
    # styles and colours cycle at periods 4 and 10, so 20 runs still differ
    width = max(1.0, 3.6 - 0.6 * i) if stacked else 1.8
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": _STYLES[i % len(_STYLES)], "linewidth": width}


def save_figure(fig: Figure, path: Path) -> None:
    """Renders ``fig`` to a PNG at the report's resolution, on its own Agg canvas (no pyplot state)."""
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI)


def _new_axes(title: str, xlabel: str, ylabel: str, legend_entries: int) -> tuple[Figure, Axes]:
    rows = -(-legend_entries // 2)  # the legend goes below the axes, two entries a row
    fig = Figure(figsize=(8, 4.4 + 0.25 * rows), layout="constrained")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _short_run_style(run: Run) -> dict[str, object]:
    """Too few steps for a curve: the points alone, so two of them are not read as a trend."""
    return {"linestyle": "none", "marker": "o"} if run.too_short else {}


def _notes(runs: Sequence[Run]) -> list[Line2D]:
    """Legend entries, without a line, saying which runs are too short for a curve."""
    return [Line2D([], [], linestyle="none", label=f"{run.label}: {run.too_short}") for run in runs
            if run.too_short and run.train]


def _legend(ax: Axes, extra: Sequence[Line2D] = ()) -> None:
    """Puts the legend under the axes: inside, it hides curves of noisy timings whatever corner it picks."""
    ax.margins(x=0)  # the x axis spans the logged steps, no padding past the last one
    handles, labels = ax.get_legend_handles_labels()
    handles += list(extra)
    labels += [str(h.get_label()) for h in extra]
    if not handles:
        ax.text(0.5, 0.5, "no data in these runs", ha="center", va="center", transform=ax.transAxes, color="gray")
        return
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize="small",
              frameon=False)


def line_figure(runs: Sequence[Run], key: str, default: float | None, title: str, ylabel: str,
                percent: bool = False, stacked: bool = False) -> Figure:
    """One record key over steps, a line per run (points only for a run too short for a curve)."""
    notes = _notes(runs)
    fig, ax = _new_axes(title, "step", ylabel, len(runs) + len(notes))
    scale = 100.0 if percent else 1.0
    for i, run in enumerate(runs):
        steps, values = run.series(key, default)
        if steps:
            style = {**_style(i, stacked), **_short_run_style(run)}
            ax.plot(steps, [v * scale for v in values], label=run.label, **style)  # type: ignore[arg-type]
    _legend(ax, notes)
    return fig


def _tokens_at(run: Run) -> Callable[[int], float]:
    """Cumulative tokens at a step, so validation points (which carry no token count) fit the tokens axis."""
    steps, tokens = run.series("tokens")
    xs, ys = [0, *steps], [0.0, *tokens]
    return lambda step: float(np.interp(step, xs, ys))


def loss_figure(runs: Sequence[Run], x_tokens: bool) -> Figure:
    """Train loss (lines) and validation loss (circles) over steps or over tokens seen."""
    xlabel = "tokens seen (all processes)" if x_tokens else "step"
    title = "Loss vs tokens" if x_tokens else "Loss vs step"
    notes = _notes(runs)
    fig, ax = _new_axes(title, xlabel, "cross-entropy loss", len(runs) + 2 + len(notes))
    for i, run in enumerate(runs):
        style = {**_style(i, stacked=True), **_short_run_style(run)}
        to_x: Callable[[int], float] | None = float
        if x_tokens:
            points = [(float(r["tokens"]), float(r["loss"])) for r in run.train
                      if isinstance(r.get("tokens"), int | float)]
            to_x = _tokens_at(run) if points else None  # no token counts: no honest x for val points either
        else:
            points = [(float(r["step"]), float(r["loss"])) for r in run.train]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=run.label, **style)  # type: ignore[arg-type]
        if run.evals and to_x is not None:
            ax.plot([to_x(int(r["step"])) for r in run.evals], [r["val_loss"] for r in run.evals], linestyle="none",
                    marker="o", markersize=max(4.0, 11.0 - 1.8 * i), markerfacecolor="none", markeredgewidth=1.5,
                    color=style["color"])  # shrinking circles: equal val losses show as rings
    markers = [Line2D([], [], color="black", linewidth=1.8, label="train loss (lines)"),
               Line2D([], [], color="black", linestyle="none", marker="o", markerfacecolor="none",
                      label="val loss (circles)")]
    _legend(ax, [*markers, *notes] if any(r.train or r.evals for r in runs) else ())
    return fig


def _edges(steps: Sequence[int]) -> np.ndarray:
    """Cell edges: a logged step's cell reaches back to the step logged before it, so the last cell
    ends at the last step and gaps (``log_every`` > 1, resumes) keep their width.

    The first cell is as wide as the gap after it (one step when it is the only one): with
    ``log_every=1`` from step 1, the cells are ``(0, 1], (1, 2], ...``, the steps they end.
    """
    s = np.asarray(steps, dtype=float)
    first_gap = s[1] - s[0] if len(s) > 1 else 1.0
    return np.concatenate([[s[0] - first_gap], s])


def heatmap_figure(run: Run, layer: int) -> Figure | None:
    """Tokens routed to each expert of one MoE layer, per logged step; None when the run logged none."""
    rows = [(int(r["step"]), r["layers"][layer]["tokens_per_expert"]) for r in run.train
            if len(r.get("layers") or []) > layer and r["layers"][layer].get("tokens_per_expert")]
    if not rows:
        return None
    width = max(len(loads) for _, loads in rows)
    grid = np.full((width, len(rows)), np.nan)
    for j, (_, loads) in enumerate(rows):
        grid[: len(loads), j] = loads
    steps = [s for s, _ in rows]
    fig = Figure(figsize=(8, 2.2 + min(width, 64) * 0.09), layout="constrained")
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(_edges(steps), np.arange(width + 1) - 0.5, grid, cmap="viridis", shading="flat")
    title = f"Tokens routed per expert: {run.label}, MoE layer {layer}"
    note = f"\n(only {len(steps)} logged step{'' if len(steps) == 1 else 's'})" if run.too_short else ""
    ax.set(title=title + note, xlabel="step", ylabel="expert")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(width - 0.5, -0.5)  # expert 0 on top, like a table
    if width <= 32:
        ax.set_yticks(range(width))
    fig.colorbar(mesh, ax=ax, label="tokens routed (per step)", pad=0.01)
    return fig


def write_plots(runs: Sequence[Run], out: Path) -> list[tuple[str, str]]:
    """Draws every figure into ``out``; returns ``(file name, title)`` pairs in reading order."""
    figures: list[tuple[str, str]] = []
    # (file, title, record key, value when absent, y label, as percent, stacked: runs often coincide)
    line_plots = [
        ("tokens_per_s.png", "Throughput", "tokens_per_s", None, "tokens/s (all processes)", False, False),
        ("comm_share.png", "Communication share of step time", "comm_share", 0.0,
         "all-to-all + grad sync (% of step time)", True, False),
        ("load_imbalance.png", "Expert load imbalance", "load_imbalance", None,
         "max/mean tokens per expert (1 = balanced)", False, True),
        ("load_cv.png", "Expert load coefficient of variation", "load_cv", None,
         "std/mean tokens per expert, mean over layers (0 = balanced)", False, True),
        ("load_min_share.png", "Least-used expert", "load_min_share", None,
         "its tokens / the fair share, lowest layer (1 = balanced, 0 = dead)", False, True),
    ]
    for name, title, key, default, ylabel, percent, stacked in line_plots:
        save_figure(line_figure(runs, key, default, title, ylabel, percent, stacked), out / name)
        figures.append((name, title))
    save_figure(loss_figure(runs, x_tokens=False), out / "loss_vs_step.png")
    figures.append(("loss_vs_step.png", "Loss vs step"))
    save_figure(loss_figure(runs, x_tokens=True), out / "loss_vs_tokens.png")
    figures.append(("loss_vs_tokens.png", "Loss vs tokens"))
    for run in runs:
        for layer in range(run.num_layers):
            name = f"expert_load_{run.slug}_layer{layer}.png"
            fig = heatmap_figure(run, layer)
            if fig is not None:
                save_figure(fig, out / name)
                figures.append((name, f"Expert load: {run.label}, layer {layer}"))
    return figures
