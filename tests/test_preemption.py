"""SIGTERM in a ``single`` run, in this process: a checkpoint of the step in flight, then ``Preempted``.

Through ``moe-submit stop`` with Ray actors: tests/launch/test_submit.py; every rank stopping
after the same step: tests/actors/test_reliability.py.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from moe_trainer.preemption import Preempted
from tests.helpers import read_records, train_run


def test_sigterm_saves_the_step_in_flight_and_gives_the_handler_back(tmp_path: Path) -> None:
    before = signal.getsignal(signal.SIGTERM)
    metrics = tmp_path / "metrics.jsonl"

    def terminate_once_training() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=terminate_once_training, daemon=True).start()
    with pytest.raises(Preempted) as stopped:
        train_run(tmp_path, "train.max_steps=100000", "train.log_every=1", "train.checkpoint_every=0",
                  "train.eval_every=100000", "logger.mode=disabled")
    step = stopped.value.step
    last = max(r["step"] for r in read_records(tmp_path) if "loss" in r)
    assert step == last and 1 <= step < 100000  # every finished step is in the checkpoint
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step_{step:08d}"]
    event = json.loads(metrics.read_text().splitlines()[-1])
    assert event["preempted"] == "SIGTERM" and event["step"] == step and event["preempt_exit_s"] < 120
    assert signal.getsignal(signal.SIGTERM) is before  # a later run in this process gets SIGTERM's old handler
