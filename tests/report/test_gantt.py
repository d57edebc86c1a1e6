"""Gantt charts of step timelines, drawn from trace files as the driver writes them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from matplotlib.colors import to_rgba

from moe_trainer.report import main
from moe_trainer.report.gantt import COLORS, gantt_figure, gantt_figures, read_trace, write_gantts
from moe_trainer.report.load import Run
from moe_trainer.timeline import CATEGORIES, chrome_trace
from tests.report.test_report import assert_real_png

WALL = 1.7e15  # microseconds since the epoch, as the recorder writes them


def event(name: str, cat: str, start_ms: float, dur_ms: float, pid: int, tid: int = 0) -> dict[str, Any]:
    return {"name": name, "cat": cat, "ph": "X", "ts": WALL + start_ms * 1e3, "dur": dur_ms * 1e3, "pid": pid,
            "tid": tid, "args": {}}


def process(pid: int, role: str) -> dict[str, Any]:
    return {"name": "process_name", "ph": "M", "pid": pid, "tid": 0, "args": {"name": f"rank {pid} · {role}"}}


def write_trace(path: Path, strategy: str, step: int, length_ms: float) -> Path:
    """A disaggregated-like step: a coordinator whose transfers nest in its forward, an expert actor that waits."""
    events = [process(0, "coordinator"), process(1, "experts"),
              event("forward", "compute", 0.0, length_ms * 0.5, 0), event("dispatch", "transfer", 1.0, 2.0, 0, 1),
              event("combine", "transfer", 4.0, 0.001, 0, 1),  # a few microseconds: still drawn
              event("optimizer", "optimizer", length_ms * 0.8, length_ms * 0.2, 0),
              event("wait", "wait", 0.5, 3.0, 1), event("experts", "compute", 3.5, 1.0, 1),
              event("grad sync", "sync", length_ms * 0.6, 1.0, 1)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chrome_trace(events, {"strategy": strategy, "step": step})))
    return path


def run_with(tmp_path: Path, name: str, strategy: str, steps: dict[int, float]) -> Run:
    timelines = {step: write_trace(tmp_path / name / "timelines" / f"step_{step:06d}.json", strategy, step, length)
                 for step, length in steps.items()}
    return Run(tmp_path / name, {"parallel": {"strategy": strategy}}, {}, [], [], label=strategy, slug=strategy,
               timelines=timelines)


def test_one_row_per_rank_and_lane_coloured_by_category(tmp_path: Path) -> None:
    trace = read_trace(write_trace(tmp_path / "step_000002.json", "disaggregated", 2, 40.0))
    assert trace is not None and trace.step == 2 and trace.strategy == "disaggregated"
    assert trace.duration_ms == pytest.approx(40.0)
    fig = gantt_figure(trace, "Step 2")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["rank 0 · coordinator", "lane 1", "rank 1 · experts"]
    drawn: dict[tuple[float, ...], list[Any]] = {}
    for bars in ax.collections:
        drawn.setdefault(tuple(bars.get_facecolor()[0]), []).append(bars)
    assert set(drawn) == {to_rgba(COLORS[cat]) for cat in ("compute", "transfer", "optimizer", "wait", "sync")}
    transfers = drawn[to_rgba(COLORS["transfer"])][0]
    widths = sorted(path.get_extents().width for path in transfers.get_paths())
    assert widths[0] == pytest.approx(0.002 * 40.0 * 1.02)  # the 1 us combine: a sliver, not nothing
    assert ax.get_xlim() == pytest.approx((0.0, 40.8)) and "(ms)" in ax.get_xlabel()
    assert [t.get_text() for t in fig.legends[0].get_texts()] == list(CATEGORIES)
    assert "forward" in [t.get_text() for t in ax.texts]  # wide bars carry their name


def test_runs_share_one_time_axis_unless_asked_and_the_newest_step_is_drawn(tmp_path: Path) -> None:
    short = run_with(tmp_path, "ep", "expert_parallel", {2: 10.0, 50: 12.0})
    long = run_with(tmp_path, "dis", "disaggregated", {2: 40.0})
    out = tmp_path / "report"
    out.mkdir()
    figures = write_gantts([short, long], out)
    assert figures == [("timeline_expert_parallel_step000050.png", "Step timeline: expert_parallel, step 50"),
                       ("timeline_disaggregated_step000002.png", "Step timeline: disaggregated, step 2")]
    for name, _ in figures:
        assert_real_png(out / name)

    def x_ranges(scale: str) -> list[tuple[float, float]]:
        return [fig.axes[0].get_xlim() for _, _, fig in gantt_figures([short, long], scale=scale)]

    assert x_ranges("shared") == [pytest.approx((0, 40.8))] * 2  # the same bar length is the same time
    assert x_ranges("own") == [pytest.approx((0, 12.24)), pytest.approx((0, 40.8))]
    assert [name for name, _ in write_gantts([short, long], out, step=2, scale="own")] == [
        "timeline_expert_parallel_step000002.png", "timeline_disaggregated_step000002.png"]
    assert write_gantts([short, long], out, step=7) == []  # no run sampled step 7


def test_unreadable_or_empty_traces_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "torn.json").write_text('{"traceEvents": [{"name": "forw')
    (tmp_path / "empty.json").write_text(json.dumps(chrome_trace([process(0, "single")], {"step": 2})))
    assert read_trace(tmp_path / "torn.json") is None and read_trace(tmp_path / "empty.json") is None


def test_moe_report_draws_the_chosen_step_and_says_which_runs_lack_it(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "run"
    write_trace(run_dir / "timelines" / "step_000002.json", "expert_parallel", 2, 10.0)
    write_trace(run_dir / "timelines" / "step_000050.json", "expert_parallel", 50, 12.0)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 5.0, "tokens": 64}) + "\n")
    (run_dir / "config.yaml").write_text("parallel: {strategy: expert_parallel}\n")
    main([str(run_dir), "--out", str(tmp_path / "a"), "--timeline-step", "2", "--timeline-scale", "own"])
    assert "timeline_expert_parallel_step000002.png" in (tmp_path / "a" / "summary.md").read_text()
    assert_real_png(tmp_path / "a" / "timeline_expert_parallel_step000002.png")
    capsys.readouterr()
    main([str(run_dir), "--out", str(tmp_path / "b"), "--timeline-step", "7"])
    assert f"expert_parallel: {run_dir} (no timeline of step 7; it has steps 2, 50)" in capsys.readouterr().out
    assert not list((tmp_path / "b").glob("timeline_*.png"))
