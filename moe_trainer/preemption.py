"""Preemption: SIGTERM ends a run at the next step boundary, with a checkpoint, within a bounded time.

Schedulers take machines back with SIGTERM and a grace period (Kubernetes, Slurm, spot
instances), and ``moe-submit stop`` (Ray Jobs) sends the driver SIGTERM too. The handler only
sets a flag; a thread of its own then asks the engine to stop (every rank of a Ray strategy
agrees on the step to stop after, see :func:`moe_trainer.train.nan_guard.run_steps`), and the
driver loop saves a checkpoint at that step boundary and exits with :data:`EXIT_CODE`. If the
step and the save take longer than ``fault_tolerance.preempt_timeout_s``, the process exits
anyway: checkpoints are written into a temporary directory and renamed when complete, so a
forced exit leaves the previous checkpoints intact and no half-written one.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

EXIT_CODE = 128 + signal.SIGTERM  # 143: what a shell reports for a process ended by SIGTERM


class Preempted(Exception):  # noqa: N818 - an outcome, not an error: the run stopped as asked
    """The run was stopped by SIGTERM at a step boundary; its state is in ``checkpoint``."""

    def __init__(self, step: int, checkpoint: str, save_time_s: float, waited_s: float) -> None:
        self.step, self.checkpoint, self.save_time_s, self.waited_s = step, checkpoint, save_time_s, waited_s
        super().__init__(f"preempted (SIGTERM) at step {step}: checkpoint {checkpoint} saved in {save_time_s:.1f} s, "
                         f"{waited_s:.1f} s after the signal")


class Preemption:
    """SIGTERM's handler for one training run: :meth:`install` it, :meth:`listen` with the engine's stop."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.requested = threading.Event()
        self.requested_at = 0.0  # time.monotonic() of the signal
        self._listener: Callable[[], None] | None = None
        self._done = threading.Event()
        self._previous: Any = None
        self._installed = False

    def install(self) -> Preemption:
        """Takes SIGTERM (only the main thread can; elsewhere, e.g. a test's thread, nothing changes)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)
            self._installed = True
        return self

    def uninstall(self) -> None:
        """Gives SIGTERM back to its previous handler (the default one if it was set outside Python); the
        watchdog, if running, stands down. Call it last: the watchdog's bound covers what comes before."""
        self._done.set()
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def listen(self, stop: Callable[[], None]) -> None:
        """``stop`` (the current engine's ``request_stop``) is called once when SIGTERM comes, or now if it came."""
        self._listener = stop
        if self.requested.is_set():
            stop()

    def elapsed_s(self) -> float:
        """Seconds since SIGTERM came (0 when it did not)."""
        return time.monotonic() - self.requested_at if self.requested.is_set() else 0.0

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.requested.is_set():
            return  # a repeated SIGTERM: already stopping
        self.requested_at = time.monotonic()
        self.requested.set()
        threading.Thread(target=self._after_signal, name="preemption", daemon=True).start()

    def _after_signal(self) -> None:
        """Off the signal handler: Ray calls are not made from inside one. Then the watchdog."""
        print(f"moe-train: SIGTERM: stopping at the next step boundary with a checkpoint "
              f"(at most fault_tolerance.preempt_timeout_s={self.timeout_s:g} s)", file=sys.stderr, flush=True)
        if self._listener is not None:
            try:
                self._listener()
            except Exception as err:  # the engine may be starting or gone: the driver loop still sees the flag
                print(f"moe-train: could not ask the ranks to stop: {err}", file=sys.stderr, flush=True)
        if not self._done.wait(self.timeout_s):
            print(f"moe-train: no checkpoint within fault_tolerance.preempt_timeout_s={self.timeout_s:g} s of "
                  "SIGTERM; exiting now. Checkpoints are renamed into place only when complete: the last one "
                  "is intact", file=sys.stderr, flush=True)
            os._exit(EXIT_CODE)
