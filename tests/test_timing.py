"""Timed regions never wait for the device while they are recorded; they are resolved once, when read."""

from __future__ import annotations

import re
import time

import pytest
import torch

from moe_trainer import timing
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timing import Elapsed, Span, mark


class FakeEvent:
    """Stands in for ``torch.cuda.Event`` (no GPU here): records what the timing code asks of it."""

    log: list[str] = []
    clock = 0.0

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing
        self.at = 0.0

    def record(self, stream: object = None) -> None:
        FakeEvent.clock += 0.25
        self.at = FakeEvent.clock
        FakeEvent.log.append("record")

    def synchronize(self) -> None:
        FakeEvent.log.append("synchronize")

    def elapsed_time(self, end: FakeEvent) -> float:
        return (end.at - self.at) * 1e3  # milliseconds, as CUDA reports


def test_cpu_regions_are_wall_clock() -> None:
    t0 = mark(torch.device("cpu"))
    time.sleep(0.01)
    clock = Elapsed()
    clock.add(Span.since(t0, torch.device("cpu")))
    clock.add(0.5)
    assert 0.51 <= clock.take() < 1.0
    assert clock.take() == 0.0  # read once, then from zero


def test_cuda_regions_record_events_and_wait_only_when_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("a timed region synchronised the device"))
    FakeEvent.log = []
    cuda = torch.device("cuda", 0)
    counters = CommCounters()
    for phase in ("dispatch", "combine"):
        t0 = mark(cuda)
        counters.add_transfer(phase, [3, 5], [2, 4], 0, 8, Span.since(t0, cuda))
    assert FakeEvent.log == ["record"] * 4  # nothing waited while the step ran
    out = counters.take()
    assert "synchronize" in FakeEvent.log
    assert out["a2a_dispatch_time_s"] == pytest.approx(0.25) and out["a2a_time_s"] == pytest.approx(0.5)
    assert out["a2a_dispatch_rows_sent"] == 5 and out["a2a_bytes_sent"] == 80  # rows to rank 1 only
    assert counters.take()["a2a_time_s"] == 0.0


def test_no_module_synchronises_the_device() -> None:
    """The one place that may wait is :meth:`Span.seconds`, reached from ``take`` once per step."""
    import inspect
    import pathlib

    root = pathlib.Path(inspect.getfile(timing)).parent
    waits = [str(p.relative_to(root)) for p in root.rglob("*.py") if re.search(r"cuda\.synchronize\(", p.read_text())]
    assert waits == []
