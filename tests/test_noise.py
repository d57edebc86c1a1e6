"""The third-party messages ``moe_trainer.noise`` silences, and only those."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

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


DETECT = """
import sys
if sys.argv[1] == "ours":
    import moe_trainer  # noqa: F401
from deepspeed.accelerator import get_accelerator
print(get_accelerator().device_name())
"""


def test_deepspeed_real_accelerator_detection_is_silent_after_importing_the_package() -> None:
    """The real detection, in fresh processes with no GPU visible: DeepSpeed still warns without our
    package (so the test would see a reworded warning come back) and picks the CPU either way."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    env.pop("DS_ACCELERATOR", None)
    runs = {who: subprocess.run([sys.executable, "-c", DETECT, who], env=env, capture_output=True, text=True,
                                timeout=120) for who in ("plain", "ours")}
    for out in runs.values():
        assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "cpu", out.stderr[-2000:]
    assert "Setting accelerator to CPU" in runs["plain"].stderr + runs["plain"].stdout
    assert "accelerator" not in runs["ours"].stderr.lower(), runs["ours"].stderr
