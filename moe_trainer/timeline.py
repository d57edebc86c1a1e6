"""Per-rank step timelines: what this process did, and when, during a sampled step (Chrome trace events).

One recorder per process (:data:`timeline`), that is one per rank. Code that runs a region
of a step reports it with :meth:`Timeline.region` (or :meth:`Timeline.span` for a region it
timed itself, as the all-to-all telemetry does); outside a sampled step every call is a
cheap no-op, so the hooks stay in the hot path for good.

Two choices shape it:

* **Spans are resolved at the end of the step.** On CUDA a region is a pair of events on
  the stream (:mod:`moe_trainer.timing`); reading its time waits for the device, which
  inside the step would turn overlapped work into serial work and change what is being
  measured. So regions are kept as unresolved :class:`~moe_trainer.timing.Span` objects and
  turned into times once, in :meth:`Timeline.end_step`, when the step has ended anyway.
* **Times are wall-clock microseconds, so ranks line up.** A CUDA event or
  ``perf_counter`` value means nothing in another process. At :meth:`Timeline.begin_step`
  the recorder takes ``time.time()`` and a mark on the device together; every event is
  then ``wall0 + (seconds from that mark)``, which processes on one host share (the
  system clock). Across hosts the offset is whatever their clocks differ by (NTP: usually
  well under a millisecond).

Events follow the Chrome trace event format ("complete" events, ``ph: "X"``), which
``chrome://tracing`` and https://ui.perfetto.dev open as is; :func:`chrome_trace` wraps
the events of all ranks of one step into such a file.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from moe_trainer.timing import Mark, Span, mark

# What a region is, as the Gantt chart colours it: work on the device, rows moving between ranks,
# waiting for another rank, the optimizer update, and gradient/statistics reductions.
CATEGORIES = ("compute", "transfer", "wait", "optimizer", "sync")
# The first step after warm-up (step 1 pays for allocation and lazy initialisation): every run
# that records timelines at all records this one, so even a short run has one to look at.
FIRST_SAMPLED_STEP = 2
_US = 1e6
_LANE_SLACK_US = 1e-3  # a region that starts where the previous one ended shares its lane


def is_sampled(step: int, every: int) -> bool:
    """Whether optimizer step ``step`` (1-based, as in the records) gets a timeline (``logger.timeline_every``).

    ``every <= 0`` records none; otherwise every ``every``-th step and always step 2.
    """
    return every > 0 and (step % every == 0 or step == FIRST_SAMPLED_STEP)


def check_category(cat: str) -> None:
    if cat not in CATEGORIES:
        raise ValueError(f"timeline category {cat!r} is not one of {', '.join(CATEGORIES)}")


@dataclass(frozen=True)
class _Pending:
    """A region as recorded: its marks are resolved only at the end of the step."""

    name: str
    cat: str
    span: Span
    args: Mapping[str, Any] | None


class Timeline:
    """The recorder of one process: ``begin_step`` / regions and spans / ``end_step``, once per step."""

    def __init__(self) -> None:
        self._pending: list[_Pending] | None = None  # None: not recording
        self._step, self._rank, self._role = 0, 0, "single"
        self._wall0 = 0.0
        self._mark0: Mark = 0.0

    @property
    def recording(self) -> bool:
        """True only between ``begin_step`` and ``end_step`` of a sampled step."""
        return self._pending is not None

    def begin_step(self, step: int, rank: int, role: str, device: torch.device, sampled: bool) -> None:
        """Starts step ``step`` of global rank ``rank`` (``role``: coordinator, experts, trainer, single).

        Anything left from a step that never ended (it raised) is dropped. Unless ``sampled``,
        nothing is recorded until the next ``begin_step``.
        """
        self._pending = None
        if not sampled:
            return
        self._step, self._rank, self._role = step, rank, role
        # the wall clock and the device clock read together: every event is placed relative to this pair
        self._wall0 = time.time()
        self._mark0 = mark(device)
        self._pending = []

    def span(self, name: str, cat: str, span: Span, args: Mapping[str, Any] | None = None) -> None:
        """Records a finished region (kept unresolved until ``end_step``); ``args`` shows in the trace viewer."""
        check_category(cat)  # checked every time (a tuple lookup), so a typo fails in any test, sampled or not
        if self._pending is not None:
            self._pending.append(_Pending(name, cat, span, args))

    def region(self, name: str, cat: str, device: torch.device,
               args: Mapping[str, Any] | None = None) -> AbstractContextManager[None]:
        """A ``with`` block marked at its start and end on ``device`` and recorded as a span.

        Outside a sampled step it is a shared do-nothing context (no marks, no generator):
        these blocks sit in every step, sampled or not.
        """
        check_category(cat)
        if self._pending is None:
            return _NOTHING
        return _Region(self, name, cat, device, args)

    def end_step(self) -> list[dict[str, Any]] | None:
        """This step's events (None when it was not sampled), resolving every span now (on CUDA: waits).

        Complete events (``ph: "X"``, ``ts``/``dur`` in wall-clock microseconds, ``pid`` = the
        rank, ``tid`` = a lane) plus metadata events naming the rank and its lanes. Regions
        that overlap (one nested in another, an asynchronous transfer under compute) go to
        separate lanes, so no lane holds two regions at once and each lane draws as one row.
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        events = []
        for p in pending:
            start_s = Span(self._mark0, p.span.start).seconds()
            events.append({"name": p.name, "cat": p.cat, "ph": "X", "ts": self._wall0 * _US + start_s * _US,
                           "dur": max(0.0, p.span.seconds() * _US), "pid": self._rank, "tid": 0,
                           "args": dict(p.args or {})})
        lanes = assign_lanes(events)
        rank = self._rank
        # the step rides along in the rank's name event, so a merged list says which step each rank ran
        name = {"name": f"rank {rank} · {self._role}", "step": self._step}
        meta: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": rank, "tid": 0, "args": name},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "tid": 0, "args": {"sort_index": rank}},
        ]
        meta += [{"name": "thread_name", "ph": "M", "pid": self._rank, "tid": lane, "args": {"name": f"lane {lane}"}}
                 for lane in range(lanes)]
        return meta + events


class _Region:
    """The context of :meth:`Timeline.region` during a sampled step."""

    def __init__(self, timeline: Timeline, name: str, cat: str, device: torch.device,
                 args: Mapping[str, Any] | None) -> None:
        self.timeline, self.name, self.cat, self.device, self.args = timeline, name, cat, device, args

    def __enter__(self) -> None:
        self.start = mark(self.device)

    def __exit__(self, *exc: object) -> None:
        self.timeline.span(self.name, self.cat, Span.since(self.start, self.device), self.args)


_NOTHING = nullcontext()


def assign_lanes(events: Sequence[dict[str, Any]]) -> int:
    """Sets each event's ``tid`` to the lowest lane free at its start (in place); returns the lane count.

    Events are taken by start time, longest first on ties, so an enclosing region (a forward
    pass) takes a lane before what runs inside it (its transfers), which go one lane down.
    """
    lane_ends: list[float] = []
    for event in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        free = [lane for lane, end in enumerate(lane_ends) if end <= event["ts"] + _LANE_SLACK_US]
        lane = free[0] if free else len(lane_ends)
        if not free:
            lane_ends.append(0.0)
        lane_ends[lane] = event["ts"] + event["dur"]
        event["tid"] = lane
    return len(lane_ends)


def chrome_trace(events: Sequence[dict[str, Any]], metadata: Mapping[str, Any]) -> dict[str, Any]:
    """One step's events of every rank as a Chrome trace, its first event at ``ts`` 0.

    The wall-clock time of that first event goes to ``metadata["start_unix_s"]``. Metadata
    events (process and lane names) come first, then each rank's events in time order.
    """
    timed = [e for e in events if e.get("ph") == "X"]
    t0 = min((e["ts"] for e in timed), default=0.0)
    shifted = [{**e, "ts": round(e["ts"] - t0, 3), "dur": round(e["dur"], 3)} for e in timed]
    shifted.sort(key=lambda e: (e["pid"], e["ts"], e["tid"]))
    names = [e for e in events if e.get("ph") == "M"]
    ranks = sorted({e["pid"] for e in events})
    return {"traceEvents": [*names, *shifted], "displayTimeUnit": "ms",
            "metadata": {**metadata, "ranks": ranks, "start_unix_s": t0 / _US, "time_unit": "us"}}


timeline = Timeline()
