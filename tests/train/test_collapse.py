"""Collapsing experts are reported once, naming layer, block and expert, and again when they recover."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_trainer.logging.wandb_reader import read_offline_run
from moe_trainer.train.collapse import CollapseWatch
from tests.helpers import train_run


def _record(step: int, *layers: list[int]) -> dict[str, object]:
    return {"step": step, "layers": [{"tokens_per_expert": load} for load in layers]}


def test_an_expert_under_its_share_for_the_configured_steps_is_reported_once_then_its_recovery() -> None:
    watch = CollapseWatch(share=0.1, steps=3, blocks=[1, 3])
    healthy, starved = [25, 25, 25, 25], [33, 33, 33, 1]  # expert 3: 1 / 25 = 4% of its fair share
    assert watch.observe(_record(1, healthy, starved)) == []
    assert watch.observe(_record(2, healthy, starved)) == []
    assert watch.observe(_record(3, healthy, healthy)) == []  # recovered before 3 steps: the count restarts
    reports = [watch.observe(_record(s, healthy, starved)) for s in (4, 5, 6, 7)]
    assert [len(r) for r in reports] == [0, 0, 1, 0]  # reported once, at the third step in a row
    report = reports[2][0]
    assert (report.layer, report.block, report.expert, report.since_step, report.recovered) == (1, 3, 3, 4, False)
    line = report.line(0.1, 3)
    assert line.startswith("expert collapsing: expert 3 of MoE layer 1 (block 3) got under 10% of its fair share")
    assert "for 3 steps in a row (since step 4; 4.0% at step 6)" in line
    recovered = watch.observe(_record(8, healthy, healthy))
    assert len(recovered) == 1 and recovered[0].recovered and recovered[0].record()["event"] == "expert_recovered"
    assert CollapseWatch(share=0.1, steps=0, blocks=[0]).observe(_record(1, starved)) == []  # 0 steps: off


def test_a_run_reports_collapsing_experts_on_the_console_in_metrics_and_as_a_wandb_alert(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A share threshold of 99% makes any expert below its exact fair share count, so the debug model reports."""
    run = train_run(tmp_path / "run", "logger.mode=offline", "logger.collapse_share=0.99", "logger.collapse_steps=2",
                    "train.max_steps=4")
    events = [r for r in run.records if r.get("event") == "expert_collapsing"]
    assert events and {"moe_layer", "block", "expert", "expert_share", "below_since_step"} <= events[0].keys()
    assert "warning: expert collapsing: expert" in capsys.readouterr().out  # the progress bar's channel
    offline = read_offline_run(next((tmp_path / "run" / "wandb").glob("offline-run-*")))
    assert len(offline.alerts) == len(events)
    assert offline.alerts[0]["title"].endswith("collapsing") and "fair share" in offline.alerts[0]["text"]
