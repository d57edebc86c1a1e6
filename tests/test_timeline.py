"""Step timelines: the recorder (sampling, events in wall-clock order, lanes, no-ops, no device waits), a real run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_trainer import timeline as timeline_module
from moe_trainer.logging import find_offline_runs, iter_records, read_offline_run
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.report import build_report
from moe_trainer.timeline import CATEGORIES, Timeline, assign_lanes, chrome_trace, is_sampled, timeline
from moe_trainer.timing import Span, mark
from tests.helpers import train_run
from tests.report.test_report import assert_real_png
from tests.test_timing import FakeEvent

CPU = torch.device("cpu")


def complete(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The complete ("X") events by name (names are unique in these tests)."""
    return {e["name"]: e for e in events if e["ph"] == "X"}


def test_sampling_is_step_2_and_every_nth_step_and_nothing_when_off() -> None:
    assert [s for s in range(1, 121) if is_sampled(s, 50)] == [2, 50, 100]
    assert [s for s in range(1, 10) if is_sampled(s, 3)] == [2, 3, 6, 9]
    assert all(is_sampled(s, 1) for s in range(1, 5))
    assert not any(is_sampled(s, 0) for s in range(1, 200))


def test_regions_are_wall_clock_microseconds_in_order_with_nesting_on_its_own_lane() -> None:
    rec = Timeline()
    before = time.time() * 1e6
    rec.begin_step(7, rank=3, role="coordinator", device=CPU, sampled=True)
    assert rec.recording
    with rec.region("forward", "compute", CPU, {"pass": 0}):
        time.sleep(0.01)
        with rec.region("dispatch", "transfer", CPU):
            time.sleep(0.005)
    with rec.region("optimizer", "optimizer", CPU):
        pass
    events = rec.end_step()
    after = time.time() * 1e6
    assert events is not None and not rec.recording
    x = complete(events)
    fwd, dispatch, opt = x["forward"], x["dispatch"], x["optimizer"]
    assert before <= fwd["ts"] < dispatch["ts"] < opt["ts"] <= after
    assert fwd["dur"] >= 15_000 and 5_000 <= dispatch["dur"] <= fwd["dur"]  # microseconds
    assert dispatch["ts"] + dispatch["dur"] <= fwd["ts"] + fwd["dur"] <= opt["ts"]
    assert (fwd["tid"], dispatch["tid"], opt["tid"]) == (0, 1, 0)  # nested: one lane down; after it: lane 0 again
    assert {e["pid"] for e in events} == {3} and fwd["args"] == {"pass": 0} and fwd["cat"] == "compute"
    names = {e["name"]: e["args"] for e in events if e["ph"] == "M" and e["tid"] == 0}
    assert names["process_name"] == {"name": "rank 3 · coordinator", "step": 7}
    lanes = [e["args"]["name"] for e in events if e["name"] == "thread_name"]
    assert lanes == ["lane 0", "lane 1"]


def test_outside_a_sampled_step_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Timeline()
    monkeypatch.setattr(timeline_module, "mark", lambda device: pytest.fail("marked while not recording"))
    with rec.region("forward", "compute", CPU):
        pass
    rec.span("dispatch", "transfer", Span(0.0, 1.0))
    assert rec.end_step() is None
    rec.begin_step(1, 0, "single", CPU, sampled=False)
    assert not rec.recording
    with rec.region("forward", "compute", CPU):
        pass
    assert rec.end_step() is None


def test_categories_are_checked_sampled_or_not() -> None:
    rec = Timeline()
    assert CATEGORIES == ("compute", "transfer", "wait", "optimizer", "sync")
    with pytest.raises(ValueError, match="'io' is not one of compute, transfer, wait, optimizer, sync"):
        rec.span("read", "io", Span(0.0, 1.0))
    rec.begin_step(2, 0, "single", CPU, sampled=True)
    with pytest.raises(ValueError, match="'Compute'"), rec.region("forward", "Compute", CPU):
        pass


def test_a_step_that_never_ended_is_dropped_by_the_next_begin() -> None:
    rec = Timeline()
    rec.begin_step(2, 0, "single", CPU, sampled=True)
    with rec.region("forward", "compute", CPU):
        pass  # the step raised here: end_step never ran
    rec.begin_step(3, 0, "single", CPU, sampled=True)
    with rec.region("backward", "compute", CPU):
        pass
    assert list(complete(rec.end_step() or [])) == ["backward"]


def test_cuda_spans_wait_for_the_device_only_in_end_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Event pairs are recorded during the step and resolved (synchronize, elapsed_time) only at its end."""
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    FakeEvent.log, FakeEvent.clock = [], 0.0
    cuda = torch.device("cuda", 0)
    rec = timeline  # the process's recorder, which telemetry reports to
    rec.begin_step(2, 1, "trainer", cuda, sampled=True)  # the begin mark: clock 0.25 s
    with rec.region("forward", "compute", cuda):  # 0.5 -> 0.75
        pass
    t0 = mark(cuda)  # 1.0; a transfer timed by the dispatcher, reported through telemetry
    CommCounters().add("combine", 3, 2, 8, Span.since(t0, cuda))  # -> 1.25
    assert "synchronize" not in FakeEvent.log, "a span was resolved while the step ran"
    events = rec.end_step()
    assert "synchronize" in FakeEvent.log
    x = complete(events or [])
    assert x["combine"]["ts"] - x["forward"]["ts"] == pytest.approx(0.5e6)
    assert x["forward"]["dur"] == pytest.approx(0.25e6) and x["combine"]["dur"] == pytest.approx(0.25e6)
    assert x["combine"]["cat"] == "transfer"
    assert x["combine"]["args"] == {"rows_sent": 3, "rows_recv": 2, "bytes_sent": 24}


def test_telemetry_reports_timed_transfers_to_the_process_timeline() -> None:
    counters = CommCounters()
    counters.add("dispatch", 4, 4, 8, 0.5)  # a plain float: nothing to place on a timeline
    timeline.begin_step(2, 0, "trainer", CPU, sampled=True)
    t0 = mark(CPU)
    counters.add_transfer("dispatch", [1, 5], [2, 3], 0, 16, Span.since(t0, CPU))
    counters.add("dispatch", 4, 4, 8, 0.5)
    events = timeline.end_step() or []
    assert [(e["name"], e["cat"], e["args"]) for e in events if e["ph"] == "X"] == [
        ("dispatch", "transfer", {"rows_sent": 5, "rows_recv": 3, "bytes_sent": 80})]


def test_lanes_hold_no_two_regions_at_once() -> None:
    events = [{"ts": 0.0, "dur": 10.0}, {"ts": 2.0, "dur": 3.0}, {"ts": 4.0, "dur": 4.0},  # nested, then overlapping
              {"ts": 10.0, "dur": 1.0}, {"ts": 6.0, "dur": 1.0}]
    assert assign_lanes(events) == 3
    assert [e["tid"] for e in events] == [0, 1, 2, 0, 1]  # 6.0 starts after 2.0+3.0 ended: lane 1 again


def test_chrome_trace_starts_the_step_at_zero_and_keeps_ranks_aligned() -> None:
    wall = 1.7e15  # microseconds since the epoch, as the recorder writes them
    events = [
        {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "rank 1 · experts"}},
        {"name": "forward", "cat": "compute", "ph": "X", "ts": wall + 500.0, "dur": 20.0, "pid": 1, "tid": 0,
         "args": {}},
        {"name": "forward", "cat": "compute", "ph": "X", "ts": wall + 250.0, "dur": 30.0, "pid": 0, "tid": 0,
         "args": {}},
    ]
    trace = chrome_trace(events, {"strategy": "disaggregated", "step": 2})
    assert trace["displayTimeUnit"] == "ms"
    assert trace["metadata"] == {"strategy": "disaggregated", "step": 2, "ranks": [0, 1],
                                 "start_unix_s": pytest.approx((wall + 250.0) / 1e6), "time_unit": "us"}
    first, *timed = trace["traceEvents"]
    assert first["ph"] == "M"
    assert [(e["pid"], e["ts"], e["dur"]) for e in timed] == [(0, 0.0, 30.0), (1, 250.0, 20.0)]


def test_a_single_run_writes_its_step_2_trace_to_the_run_dir_the_wandb_run_and_the_report(
        tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Through the real driver (``parallel=single``, offline W&B), then ``moe-report`` on the run dir."""
    run_dir = tmp_path / "run"
    result = train_run(run_dir, "train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=0",
                       "logger.mode=offline")
    assert "wandb" not in capfd.readouterr().err.lower(), "saving the file printed a W&B line on the console"
    assert sorted(p.name for p in (run_dir / "timelines").iterdir()) == ["step_000002.json"]
    trace = json.loads((run_dir / "timelines" / "step_000002.json").read_text())
    assert trace["displayTimeUnit"] == "ms"
    assert {k: trace["metadata"][k] for k in ("strategy", "step", "ranks")} == {"strategy": "single", "step": 2,
                                                                                 "ranks": [0]}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for e in spans:  # what a Chrome trace viewer needs of a complete event
        assert {"name", "cat", "ph", "ts", "dur", "pid", "tid", "args"} <= set(e)
        assert isinstance(e["ts"], float) and e["ts"] >= 0 and e["dur"] >= 0 and e["cat"] in CATEGORIES
    assert min(e["ts"] for e in spans) == 0.0
    assert {"forward", "backward", "grad sync", "grad norm", "optimizer"} <= {e["name"] for e in spans}
    names = [e for e in trace["traceEvents"] if e["ph"] == "M" and e["name"] == "process_name"]
    assert [e["args"]["name"] for e in names] == ["rank 0 · single"]
    assert not any("timeline" in r for r in result.records), "the event list went into metrics.jsonl"

    (offline,) = find_offline_runs(run_dir / "wandb")
    saved = offline / "files" / "timelines" / "step_000002.json"
    assert not saved.is_symlink() and json.loads(saved.read_text()) == trace
    # what `wandb sync` uploads: the file is named in the run's transaction log
    (log,) = offline.glob("run-*.wandb")
    files = [item.path for record in iter_records(log) if record.WhichOneof("record_type") == "files"
             for item in record.files.files]
    assert "timelines/step_000002.json" in files
    assert not any(key.startswith(("timeline", "perf/timeline")) for key in read_offline_run(offline).metric_keys())

    _, written = build_report([run_dir], tmp_path / "report")
    assert "timeline_single_step000002.png" in written
    assert_real_png(tmp_path / "report" / "timeline_single_step000002.png")
