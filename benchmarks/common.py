"""Shared helpers for benchmark scripts: compose configs like moe-train, print tables, write JSON."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import torch

from moe_trainer.config.schema import Config

RESULTS = Path(__file__).resolve().parent / "results"


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
