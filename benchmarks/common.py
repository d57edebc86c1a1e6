"""Shared helpers for benchmark scripts: compose configs like moe-train, print tables, write JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from moe_trainer.config.schema import Config

RESULTS = Path(__file__).resolve().parent / "results"

# The model every "default model" result in docs/benchmarks.md, docs/architecture.md and docs/comparison.md
# was measured on: conf/'s default before 2026-12-04 (Mixtral-shaped, 8 experts of 256, top-2, every block
# MoE, aux loss alone, no selection noise, batch 16; 3,478,912 parameters, 1,119,616 active). The default
# has since become 64 experts of 13, top-8, on d_model 32 (conf/moe/default.yaml). The benchmark scripts that
# compose the default put these overrides first, so their documented numbers stay reproducible; a later
# override (a script's own or the command line's) still wins. For moe-train: `.venv/bin/moe-train <these> ...`.
# Not reproduced: model=dense on top of these is 515 wide where it was 512 (its width now counts the
# router's 8 x 128 weights as round(8 / 3) = 3 units); no override restores the old formula.
OLD_DEFAULT = ["model.d_model=128", "model.n_heads=4", "model.ffn_hidden=512", "moe.num_experts=8", "moe.top_k=2",
               "moe.expert_hidden=256", "moe.aux_loss_coef=0.01", "moe.bias_balancing=false",
               "moe.selection_noise=0", "moe.bias_update_rate=0.001", "train.batch_size=16"]


def old_default(key: str) -> int:
    """One size of :data:`OLD_DEFAULT` (``old_default("model.d_model")`` is 128), for scripts that build the
    layer without composing a config."""
    return int(next(o.split("=", 1)[1] for o in OLD_DEFAULT if o.startswith(key + "=")))


def config(overrides: list[str]) -> tuple[Config, dict[str, Any]]:
    # Hydra only here: the torch-only GPU check imports this module for its tables
    from omegaconf import OmegaConf

    from moe_trainer.cli import compose_config
    from moe_trainer.config.schema import to_dataclass

    dcfg = compose_config(overrides)
    return to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True)  # type: ignore[return-value]


def machine() -> dict[str, Any]:
    return {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> None:
    def fmt(value: Any) -> str:
        return f"{value:,.3f}" if isinstance(value, float) else str(value)

    widths = [max([len(c), *(len(fmt(r.get(c, ""))) for r in rows)]) for c in columns]  # rows may be empty
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(columns, widths, strict=True)))


def write_json(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=1))
    return path


def loadavg() -> list[float]:
    """1/5/15-minute load averages: other processes on a shared box skew timings, so results record them."""
    import os

    return [round(x, 2) for x in os.getloadavg()]


def square_matmul_flops(side: int = 2048, iters: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a ``side`` x ``side`` matmul (fp32 unless told) in this process: the practical peak work is
    compared with."""
    import time

    a, b = torch.randn(side, side, dtype=dtype), torch.randn(side, side, dtype=dtype)
    for _ in range(2):
        a @ b
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    return iters * 2 * side**3 / (time.perf_counter() - t0)
