"""The communication module's process setup."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def test_deepspeed_builds_its_cpu_op_in_this_environments_own_cache(tmp_path: Path) -> None:
    """One build cache per virtual environment: a shared one is rebuilt by each environment in turn.

    DeepSpeed logs its accelerator to stdout on import, so the path is the last line.
    """
    code = "import os, moe_trainer.parallel.comm; print(os.environ['TORCH_EXTENSIONS_DIR'])"
    env = {k: v for k, v in os.environ.items() if k != "TORCH_EXTENSIONS_DIR"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.splitlines()[-1]) == Path(sys.prefix) / "torch_extensions"
    env["TORCH_EXTENSIONS_DIR"] = str(tmp_path)  # the user's choice wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert Path(out.stdout.splitlines()[-1]) == tmp_path
