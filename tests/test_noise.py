"""The third-party messages ``moe_trainer.noise`` silences, and only those."""

from __future__ import annotations

import logging

import moe_trainer  # noqa: F401  (importing the package installs the filters)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_deepspeed_cpu_fallback_warning_is_dropped_and_its_other_warnings_pass() -> None:
    from deepspeed.utils import logger  # the logger DeepSpeed's accelerator detection writes to

    assert logger is logging.getLogger("DeepSpeed")
    seen = _Records()
    logger.addHandler(seen)
    try:
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("some other DeepSpeed warning")
    finally:
        logger.removeHandler(seen)
    assert seen.messages == ["some other DeepSpeed warning"]
