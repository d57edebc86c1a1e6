"""``moe-report RUN_DIR... [--out DIR] [--timeline-step N] [--timeline-scale shared|own] [--wandb ENTITY/PROJECT]``.

Load -> plots -> summary, all local; with ``--wandb``, also the W&B workspace view of the runs'
group (``dashboard.py``): written to a file first, then saved when a W&B key is available.
Every argument is checked before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

from moe_trainer.logging.wandb_logger import MODES
from moe_trainer.report.dashboard import WORKSPACE_FILE
from moe_trainer.report.gantt import SCALES, write_gantts
from moe_trainer.report.load import MAX_DEPTH, METRICS_FILE, Run, load_runs
from moe_trainer.report.plots import write_plots
from moe_trainer.report.quality import quality_markdown, quality_rows, write_quality_plots
from moe_trainer.report.summary import run_stats, write_html, write_markdown
from moe_trainer.report.wandb_view import UsageError, can_save, load_saved, plan_view, save, write_and_save

T = TypeVar("T")


class NoRunsError(ValueError):
    """A path given holds no run dir: reporting on the others would silently drop a run the user asked for."""


def build_report(paths: Sequence[Path], out: Path, timeline_step: int | None = None,
                 timeline_scale: str = "shared") -> tuple[list[Run], list[str]]:
    """Loads the runs under ``paths`` and writes figures, ``summary.md`` and ``summary.html`` into ``out``.

    Runs with step timelines get a Gantt chart of ``timeline_step`` (default: their newest
    sampled step), on one x axis for all runs unless ``timeline_scale="own"``.
    Returns the runs (labelled) and the files written, figures first.
    """
    runs = _load(paths)
    return runs, write_report(runs, out, timeline_step, timeline_scale)


def _load(paths: Sequence[Path]) -> list[Run]:
    runs, empty = load_runs(paths)
    if empty:
        where = ", ".join(str(p) for p in empty)
        raise NoRunsError(f"no run directory (a folder with {METRICS_FILE}, searched {MAX_DEPTH} levels deep) "
                          f"in: {where}")
    return runs


def write_report(runs: list[Run], out: Path, timeline_step: int | None = None,
                 timeline_scale: str = "shared") -> list[str]:
    """Writes the figures, ``summary.md`` and ``summary.html`` of loaded runs; returns the files' names."""
    out.mkdir(parents=True, exist_ok=True)
    figures = write_plots(runs, out) + write_quality_plots(runs, out) + write_gantts(runs, out, timeline_step,
                                                                                      timeline_scale)
    stats = [run_stats(run) for run in runs]
    write_markdown(stats, figures, out / "summary.md", [quality_markdown(quality_rows(runs))])
    write_html(stats, figures, out / "summary.html")
    return [name for name, _ in figures] + ["summary.md", "summary.html"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-report",
        description="Compare finished moe-train runs side by side (offline): PNG figures plus a summary table "
                    "in summary.md and summary.html.",
    )
    parser.add_argument("runs", nargs="*", type=Path, metavar="RUN_DIR",
                        help=f"a run dir (holds {METRICS_FILE}), or a folder of run dirs such as a Hydra "
                             f"multirun dir (searched {MAX_DEPTH} levels deep)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write the report (default: FIRST_RUN_DIR/report)")
    parser.add_argument("--timeline-step", type=int, default=None, metavar="N",
                        help="draw the step timeline (Gantt chart) of step N in each run that sampled it "
                             "(default: each run's newest sampled step; see logger.timeline_every)")
    parser.add_argument("--timeline-scale", choices=SCALES, default=None,
                        help="shared: every timeline chart on the x axis of the longest step, so runs compare "
                             "by eye (default); own: each fitted to its step")
    wandb = parser.add_argument_group(
        "W&B workspace view (docs/user-guide.md, \"The W&B view of a strategy comparison\")")
    wandb.add_argument("--wandb", metavar="ENTITY/PROJECT",
                       help=f"also build the W&B workspace view of the runs' group (grouped by strategy, "
                            f"sections for throughput, communication, balance, memory, losses, roles): written to "
                            f"OUT/{WORKSPACE_FILE}, then saved in that W&B project when online")
    wandb.add_argument("--group", default=None, help="the W&B group (logger.group) the view shows "
                                                     "(default: the one group of the runs given)")
    wandb.add_argument("--wandb-mode", choices=[m for m in MODES if m != "disabled"], default=None,
                       help="auto (default): save when a W&B API key is set and WANDB_MODE allows it, as training runs "
                            "log, else only write the file; online: save, or refuse before writing anything without "
                            "a key; offline: the file only")
    wandb.add_argument("--save-wandb", type=Path, metavar="FILE",
                       help=f"save a view written earlier (OUT/{WORKSPACE_FILE}) in W&B; takes no RUN_DIR")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; exits 2 with a one-line message on bad input, before writing anything."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.save_wandb is not None:
        others = [flag for flag, value in (("RUN_DIR", args.runs or None), ("--wandb", args.wandb),
                                           ("--group", args.group), ("--wandb-mode", args.wandb_mode),
                                           ("--out", args.out), ("--timeline-step", args.timeline_step),
                                           ("--timeline-scale", args.timeline_scale)) if value is not None]
        if others:
            parser.error(f"--save-wandb FILE saves a view written earlier, as it is: drop {', '.join(others)}")
        workspace = _exit_on_usage_error(lambda: load_saved(args.save_wandb))
        _exit_on_usage_error(can_save)
        if code := save(workspace, args.save_wandb):
            sys.exit(code)
        return
    if not args.runs:
        parser.error("give at least one RUN_DIR")
    for flag, value in (("--group", args.group), ("--wandb-mode", args.wandb_mode)):
        if value is not None and args.wandb is None:
            parser.error(f"{flag} is about the W&B view: give --wandb ENTITY/PROJECT with it")
    first: Path = args.runs[0]
    out: Path = args.out or (first / "report" if first.is_dir() else Path("report"))
    try:
        runs = _load(args.runs)
    except NoRunsError as err:
        _fail(str(err))
    plan = None if args.wandb is None else _exit_on_usage_error(
        lambda: plan_view(runs, args.wandb, args.group, args.wandb_mode))
    files = write_report(runs, out, args.timeline_step, args.timeline_scale or "shared")
    for run in runs:
        note = f" ({run.skipped_lines} unreadable lines skipped)" if run.skipped_lines else ""
        if args.timeline_step is not None and run.timelines and args.timeline_step not in run.timelines:
            note += f" (no timeline of step {args.timeline_step}; it has steps {', '.join(map(str, run.timelines))})"
        print(f"{run.label}: {run.path}{note}")
    print(f"wrote {len(files) - 2} figures, summary.md and summary.html for {len(runs)} runs")
    print(out, flush=True)
    if plan is not None and (code := write_and_save(plan, out)):
        sys.exit(code)


def _fail(message: str) -> NoReturn:
    print(f"moe-report: {message}", file=sys.stderr)
    sys.exit(2)


def _exit_on_usage_error(check: Callable[[], T]) -> T:
    try:
        return check()
    except UsageError as err:
        _fail(str(err))
