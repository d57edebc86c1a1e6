"""A rank's fixed memory, measured: what its imports cost, and what its in-memory token streams cost per token.

Both are measured, not assumed, in a fresh interpreter of this Python (the one the Ray
workers of an embedded cluster run): resident memory after importing what a rank imports
(torch, Ray, DeepSpeed, the trainer with ``datasets``) and one small matmul (thread pools),
then after importing the driver's Hydra and W&B (``single`` trains in the driver), then the
high-water mark after loading and tokenising a slice of the embedded corpus into the int64
streams the trainer keeps, with freed memory retained as ranks retain it
(:mod:`moe_trainer.host_memory`), then what each bf16 matmul of a new shape adds on the CPU
(oneDNN compiles and caches a kernel per shape). The measurement takes a few seconds, so it is kept in
``$MOE_TRAINER_CACHE`` (``~/.cache/moe-trainer``) under a key of this interpreter and these
libraries' versions, and measured again when one changes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

from moe_trainer.config.schema import cache_root

FORMAT = 3  # of the cached file and its measurement: a change measures again
SAMPLE_CORPUS_BYTES = 2_000_000  # enough for the per-token cost to dominate the corpus loader's own imports

_MEASURE = r"""
import json, sys
SHAPES = 48

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0

import torch
import ray
try:
    import deepspeed.comm
except ImportError:
    pass
import moe_trainer.parallel.setup, moe_trainer.engine
from moe_trainer.host_memory import retain_freed_memory
retain_freed_memory()
torch.ones(256, 256) @ torch.ones(256, 256)
rank = status("VmRSS")
import hydra, omegaconf, moe_trainer.cli
driver = status("VmRSS")
import wandb
logger = status("VmRSS")
from moe_trainer.config.schema import DataConfig
from moe_trainer.data import build_batch_source
before = status("VmRSS")
source = build_batch_source(DataConfig(embedded_max_bytes=int(sys.argv[1])), 16, 0)
tokens = source.train_tokens.numel() + source.val_tokens.numel()
data_per_token = (status("VmHWM") - before) / tokens
w = torch.randn(128, 512).to(torch.bfloat16)
xs = [torch.randn(n, 128).to(torch.bfloat16) for n in range(32, 32 * (SHAPES + 1), 32)]
outs = [torch.empty(x.shape[0], 512, dtype=torch.bfloat16) for x in xs]
before = status("VmRSS")
for x, out in zip(xs, outs):  # matmuls of new shapes, into memory allocated before: what grows is oneDNN's
    torch.mm(x, w, out=out)
bf16_kernel = (status("VmRSS") - before) / SHAPES
json.dump({"rank": rank, "driver": driver - rank, "logger": logger - driver,
           "data_per_token": data_per_token, "bf16_kernel": bf16_kernel}, sys.stdout)
"""


@dataclass(frozen=True)
class Baseline:
    """Measured bytes: a rank's imports, the driver's and W&B's on top (``single``), a token in memory."""

    rank: int
    driver: int
    logger: int
    data_per_token: float
    bf16_kernel: float = 0.0  # one cached oneDNN bf16 matmul kernel (CPU): each new shape builds one


def _key() -> str:
    # the environment and the interpreter it runs, not the name it was started by: `.venv/bin/python` (pytest, a
    # user's `python -m`) and `.venv/bin/python3` (the console scripts' shebang) would otherwise measure twice
    versions = [sys.prefix, os.path.realpath(sys.executable), sys.version, f"format={FORMAT}"]
    for dist in ("torch", "ray", "deepspeed", "datasets", "wandb", "hydra-core", "moe-trainer"):
        try:
            versions.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist}=none")
    # this project's code too: its version does not change when its imports do (a merge added
    # DCP and tokenizers to a rank's imports: 450 MB instead of the 401 MB a stale file still said)
    package = Path(__file__).resolve().parents[1]
    versions += [f"{f.relative_to(package)}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                 for f in sorted(package.rglob("*.py"))]
    return hashlib.sha256("\n".join(versions).encode()).hexdigest()[:16]


def cache_path() -> Path:
    """Under :func:`~moe_trainer.config.schema.cache_root`, with the token cache."""
    return Path(cache_root()).expanduser() / f"process-baseline-{_key()}.json"


def measure() -> Baseline:
    """Measures in a fresh interpreter (seconds: the imports of a rank, 2 MB of corpus)."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(SAMPLE_CORPUS_BYTES)], capture_output=True,
                         text=True, env=env, timeout=600, check=True).stdout
    return Baseline(**json.loads(out.strip().splitlines()[-1]))


@functools.cache
def process_baseline() -> Baseline:
    """The cached measurement for this interpreter and these libraries, measured once when missing."""
    path = cache_path()
    try:
        return Baseline(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    if sys.stderr.isatty():  # a person waiting at a terminal; a captured stderr keeps its one-line errors
        print(f"moe-train: measuring this machine's per-process memory once for the memory plan (seconds; kept in "
              f"{path.parent})", file=sys.stderr, flush=True)
    found = measure()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(asdict(found)))
        tmp.replace(path)  # atomic: a concurrent planner reads the old file or the new one
    except OSError:
        pass  # a read-only home: measure again next time
    return found
