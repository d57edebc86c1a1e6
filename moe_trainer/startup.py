"""Start-up lines on the console: what the driver is waiting for until the first step.

A Ray strategy spends tens of seconds before its first step (starting Ray, starting actor
processes that import torch and DeepSpeed, joining the process group); one line per phase
says which, so a silent terminal never looks like a hang. Only the driver prints these,
never the actors, and on stderr like every other ``moe-train:`` status line, which keeps
stdout for results (the final lines, the run directory last).
"""

from __future__ import annotations

import sys

from tqdm import tqdm


def phase(text: str) -> None:
    """Prints ``moe-train: TEXT`` on stderr, above a progress bar if one is drawn."""
    tqdm.write(f"moe-train: {text}", file=sys.stderr)
    sys.stderr.flush()
