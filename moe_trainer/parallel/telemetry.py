"""All-to-all counters a rank keeps per step; plain Python, so the driver can read them without torch.distributed."""

from __future__ import annotations

from dataclasses import dataclass, field

PHASES = ("dispatch", "combine", "dispatch_bwd", "combine_bwd")


def _zeros() -> dict[str, float]:
    return dict.fromkeys(PHASES, 0.0)


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
    seconds: dict[str, float] = field(default_factory=_zeros)

    def add(self, phase: str, rows_sent: int, rows_recv: int, row_bytes: int, seconds: float) -> None:
        self.rows_sent[phase] += rows_sent
        self.rows_recv[phase] += rows_recv
        self.bytes_sent[phase] += rows_sent * row_bytes
        self.seconds[phase] += seconds

    def add_transfer(self, phase: str, sent_splits: list[int], recv_splits: list[int], me: int, row_bytes: int,
                     seconds: float) -> None:
        """One all-to-all seen from rank ``me`` of its group: rows to and from itself do not count."""
        self.add(phase, sum(sent_splits) - sent_splits[me], sum(recv_splits) - recv_splits[me], row_bytes, seconds)

    def take(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for phase in PHASES:
            out[f"a2a_{phase}_rows_sent"] = self.rows_sent[phase]
            out[f"a2a_{phase}_rows_recv"] = self.rows_recv[phase]
            out[f"a2a_{phase}_time_s"] = self.seconds[phase]
        out["a2a_rows_sent"] = sum(self.rows_sent.values())
        out["a2a_rows_recv"] = sum(self.rows_recv.values())
        out["a2a_bytes_sent"] = sum(self.bytes_sent.values())
        out["a2a_time_s"] = sum(self.seconds.values())
        for counter in (self.rows_sent, self.rows_recv, self.bytes_sent, self.seconds):
            counter.update(_zeros())
        return out
