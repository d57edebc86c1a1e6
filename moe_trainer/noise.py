"""Third-party messages that say nothing to a ``moe-train`` user, silenced in every process we start.

Installed when the package is first imported (:mod:`moe_trainer`), which in the driver and
in every Ray actor happens before DeepSpeed is imported, so even the messages DeepSpeed logs
at import time are caught. Only messages named here are dropped; every other warning of
these libraries still reaches the console.
"""

from __future__ import annotations

import logging

# DeepSpeed logs this warning when it finds no GPU and falls back to its CPU accelerator, once
# per process (the driver and each actor). On the CPU that fallback is the intended device; a
# user who asked for GPUs that are not there is stopped by our own validation first
# (``train.device``, ``parallel.gpus_per_actor``), so the warning tells nobody anything. The
# fallback itself is untouched: DeepSpeed still picks CUDA wherever a GPU is visible.
DEEPSPEED_DROPPED = ("Setting accelerator to CPU",)


class _DropMessages(logging.Filter):
    """Drops the records whose message starts with one of ``prefixes``."""

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


_DEEPSPEED_FILTER = _DropMessages(DEEPSPEED_DROPPED)


def silence_third_party() -> None:
    """Installs the filters (idempotent). DeepSpeed's logger is named ``DeepSpeed``; filtering it
    before DeepSpeed creates it works because ``logging.getLogger`` hands DeepSpeed the same object."""
    logging.getLogger("DeepSpeed").addFilter(_DEEPSPEED_FILTER)
