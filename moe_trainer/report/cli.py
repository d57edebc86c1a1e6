"""``moe-report RUN_DIR... [--out DIR] [--timeline-step N] [--timeline-scale shared|own]``: load -> plots -> summary."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from moe_trainer.report.gantt import SCALES, write_gantts
from moe_trainer.report.load import MAX_DEPTH, METRICS_FILE, Run, load_runs
from moe_trainer.report.plots import write_plots
from moe_trainer.report.quality import quality_markdown, quality_rows, write_quality_plots
from moe_trainer.report.summary import run_stats, write_html, write_markdown


class NoRunsError(ValueError):
    """A path given holds no run dir: reporting on the others would silently drop a run the user asked for."""


def build_report(paths: Sequence[Path], out: Path, timeline_step: int | None = None,
                 timeline_scale: str = "shared") -> tuple[list[Run], list[str]]:
    """Loads the runs under ``paths`` and writes figures, ``summary.md`` and ``summary.html`` into ``out``.

    Runs with step timelines get a Gantt chart of ``timeline_step`` (default: their newest
    sampled step), on one x axis for all runs unless ``timeline_scale="own"``.
    Returns the runs (labelled) and the files written, figures first.
    """
    runs, empty = load_runs(paths)
    if empty:
        where = ", ".join(str(p) for p in empty)
        raise NoRunsError(f"no run directory (a folder with {METRICS_FILE}, searched {MAX_DEPTH} levels deep) "
                          f"in: {where}")
    out.mkdir(parents=True, exist_ok=True)
    figures = write_plots(runs, out) + write_quality_plots(runs, out) + write_gantts(runs, out, timeline_step,
                                                                                      timeline_scale)
    stats = [run_stats(run) for run in runs]
    write_markdown(stats, figures, out / "summary.md", [quality_markdown(quality_rows(runs))])
    write_html(stats, figures, out / "summary.html")
    return runs, [name for name, _ in figures] + ["summary.md", "summary.html"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-report",
        description="Compare finished moe-train runs side by side (offline): PNG figures plus a summary table "
                    "in summary.md and summary.html.",
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help=f"a run dir (holds {METRICS_FILE}), or a folder of run dirs such as a Hydra "
                             f"multirun dir (searched {MAX_DEPTH} levels deep)")
    parser.add_argument("--out", type=Path, default=None, metavar="DIR",
                        help="where to write the report (default: FIRST_RUN_DIR/report)")
    parser.add_argument("--timeline-step", type=int, default=None, metavar="N",
                        help="draw the step timeline (Gantt chart) of step N in each run that sampled it "
                             "(default: each run's newest sampled step; see logger.timeline_every)")
    parser.add_argument("--timeline-scale", choices=SCALES, default="shared",
                        help="shared: every timeline chart on the x axis of the longest step, so runs compare "
                             "by eye (default); own: each fitted to its step")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point; exits 2 with a one-line message when a path holds no run."""
    args = _parser().parse_args(argv)
    first: Path = args.runs[0]
    out: Path = args.out or (first / "report" if first.is_dir() else Path("report"))
    try:
        runs, files = build_report(args.runs, out, args.timeline_step, args.timeline_scale)
    except NoRunsError as err:
        print(f"moe-report: {err}", file=sys.stderr)
        sys.exit(2)
    for run in runs:
        note = f" ({run.skipped_lines} unreadable lines skipped)" if run.skipped_lines else ""
        if args.timeline_step is not None and run.timelines and args.timeline_step not in run.timelines:
            note += f" (no timeline of step {args.timeline_step}; it has steps {', '.join(map(str, run.timelines))})"
        print(f"{run.label}: {run.path}{note}")
    print(f"wrote {len(files) - 2} figures, summary.md and summary.html for {len(runs)} runs")
    print(out, flush=True)
