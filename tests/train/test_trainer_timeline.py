"""The training step records its timeline on sampled steps only, with every phase of the step."""

from __future__ import annotations

from collections.abc import Callable

from moe_trainer.config.schema import Config
from moe_trainer.engine import LocalEngine
from moe_trainer.timeline import CATEGORIES, timeline


def test_a_sampled_step_records_its_phases_and_other_steps_record_nothing(make_config: Callable[..., Config]) -> None:
    trainer = LocalEngine(make_config("logger.timeline_every=3", "train.grad_accum_steps=2")).trainer
    records = [trainer.train_step().record for _ in range(3)]
    assert not timeline.recording
    assert "timeline" not in records[0]  # step 1: warm-up, not sampled
    for record in records[1:]:  # step 2 (always) and step 3 (every 3rd)
        events = record["timeline"]
        steps = {e["args"]["step"] for e in events if e["name"] == "process_name"}
        assert steps == {record["step"]}
        spans = [e for e in events if e["ph"] == "X"]
        assert {e["pid"] for e in events} == {0} and {e["cat"] for e in spans} <= set(CATEGORIES)
        names = [e["name"] for e in sorted(spans, key=lambda e: e["ts"]) if e["tid"] == 0]
        # two accumulation passes, then the reductions and the update, in the order the step runs them
        assert names == ["forward", "backward", "forward", "backward", "grad sync", "grad norm", "optimizer",
                         "loss all-reduce"]
        assert [e["args"]["pass"] for e in spans if e["name"] == "forward"] == [0, 1]
        inside = [e["name"] for e in spans if e["tid"] == 1]
        assert inside == ["router loads all-reduce"] * 2  # one per forward, inside it
        assert sum(e["dur"] for e in spans if e["tid"] == 0) <= record["step_time_s"] * 1e6


def test_timeline_every_0_records_no_step(make_config: Callable[..., Config]) -> None:
    trainer = LocalEngine(make_config("logger.timeline_every=0")).trainer
    assert all("timeline" not in trainer.train_step().record for _ in range(2))
