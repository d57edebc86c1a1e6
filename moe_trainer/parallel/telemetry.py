"""All-to-all counters a rank keeps per step; no torch.distributed, so the driver can read what they give.

Times are kept as :class:`~moe_trainer.timing.Elapsed` totals: on GPU the regions are CUDA
event pairs, resolved in :meth:`CommCounters.take`, once per step (see :mod:`moe_trainer.timing`).
Each timed transfer also goes to the step timeline (:mod:`moe_trainer.timeline`; a no-op
outside a sampled step), so every dispatcher that counts its transfers draws them too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_trainer.timeline import timeline
from moe_trainer.timing import Elapsed, Span

PHASES = ("dispatch", "combine", "dispatch_bwd", "combine_bwd")


def phase_key(phase: str, what: str) -> str:
    """The record key of one all-to-all phase's ``rows_sent``, ``rows_recv`` or ``time_s``."""
    return f"a2a_{phase}_{what}"


def _zeros() -> dict[str, float]:
    return dict.fromkeys(PHASES, 0.0)


def _clocks() -> dict[str, Elapsed]:
    return {phase: Elapsed() for phase in PHASES}


@dataclass
class CommCounters:
    """Rows, bytes and time this rank moved through all-to-all since the last ``take`` (telemetry).

    Kept per phase: ``dispatch`` (tokens to experts), ``combine`` (results back) and
    their backward passes (gradients, the same rows in the other direction). Rows a
    rank sends to itself are not counted: they never leave the process.
    """

    rows_sent: dict[str, float] = field(default_factory=_zeros)
    rows_recv: dict[str, float] = field(default_factory=_zeros)
    bytes_sent: dict[str, float] = field(default_factory=_zeros)
    seconds: dict[str, Elapsed] = field(default_factory=_clocks)

    def add(self, phase: str, rows_sent: int, rows_recv: int, row_bytes: int, seconds: float | Span) -> None:
        self.rows_sent[phase] += rows_sent
        self.rows_recv[phase] += rows_recv
        self.bytes_sent[phase] += rows_sent * row_bytes
        self.seconds[phase].add(seconds)
        if timeline.recording and isinstance(seconds, Span):  # a timed transfer: a region of the step timeline
            timeline.span(phase, "transfer", seconds, {"rows_sent": rows_sent, "rows_recv": rows_recv,
                                                      "bytes_sent": rows_sent * row_bytes})

    def add_transfer(self, phase: str, sent_splits: list[int], recv_splits: list[int], me: int, row_bytes: int,
                     seconds: float | Span) -> None:
        """One all-to-all seen from rank ``me`` of its group: rows to and from itself do not count."""
        self.add(phase, sum(sent_splits) - sent_splits[me], sum(recv_splits) - recv_splits[me], row_bytes, seconds)

    def take(self) -> dict[str, float]:
        """Everything since the last call (times resolved now: on GPU the one wait of the step), then zeros."""
        out: dict[str, float] = {}
        seconds = {phase: clock.take() for phase, clock in self.seconds.items()}
        for phase in PHASES:
            out[phase_key(phase, "rows_sent")] = self.rows_sent[phase]
            out[phase_key(phase, "rows_recv")] = self.rows_recv[phase]
            out[phase_key(phase, "time_s")] = seconds[phase]
        out["a2a_rows_sent"] = sum(self.rows_sent.values())
        out["a2a_rows_recv"] = sum(self.rows_recv.values())
        out["a2a_bytes_sent"] = sum(self.bytes_sent.values())
        out["a2a_time_s"] = sum(seconds.values())
        for counter in (self.rows_sent, self.rows_recv, self.bytes_sent):
            counter.update(_zeros())
        return out
