"""Timings that never stall the device: wall clock on CPU, CUDA events on GPU, read once per step.

CUDA work is asynchronous, so a wall-clock read inside a communication wrapper only
means something after ``torch.cuda.synchronize``, and that wait turns an overlapped
all-to-all into a synchronous one. Here a timed region records a pair of CUDA events
on the current stream instead (no wait); the seconds are resolved only when telemetry
is read, once per step (:meth:`Elapsed.take`), when the step has ended anyway. On CPU
(and on ``meta``) a mark is ``time.perf_counter()``, as before.

An event pair measures the region as the device stream sees it: for an all-to-all,
the time the stream could not go on because the transfer had not landed, which is the
exposed communication time telemetry reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

Mark = Any  # float (perf_counter seconds) or a recorded torch.cuda.Event


def mark(device: torch.device) -> Mark:
    """A point in time on ``device``'s current stream (CPU: now), without waiting for queued work."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(device))
        return event
    return time.perf_counter()


@dataclass(frozen=True)
class Span:
    """A timed region: two marks of the same kind."""

    start: Mark
    end: Mark

    @classmethod
    def since(cls, start: Mark, device: torch.device) -> Span:
        """The region from ``start`` to now."""
        return cls(start, mark(device))

    def seconds(self) -> float:
        """Resolves the region; on CUDA this waits for its end event (call it once the step is over)."""
        if isinstance(self.start, float):
            return self.end - self.start
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end)) / 1e3


class Elapsed:
    """A running total of seconds and spans, resolved when read.

    Kept per telemetry key; :meth:`take` is called once per step, so on CUDA the step
    waits for its timing events once, at its end, instead of at every region.
    """

    def __init__(self) -> None:
        self._seconds = 0.0
        self._spans: list[Span] = []

    def add(self, time_s: float | Span) -> None:
        if isinstance(time_s, Span):
            self._spans.append(time_s)
        else:
            self._seconds += time_s

    def take(self) -> float:
        """The total so far (resolving every span), then starts again from zero."""
        total = self._seconds + sum(span.seconds() for span in self._spans)
        self._seconds, self._spans = 0.0, []
        return total
