"""Test helpers written once: training a run the way ``moe-train`` does, reading its records, comparing tensors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from moe_trainer.cli import train
from moe_trainer.config.schema import to_dataclass
from tests.conftest import compose_dict


@dataclass
class RunResult:
    summary: dict[str, Any]  # what ``train`` returned (also in summary.json)
    records: list[dict[str, Any]]  # every line of metrics.jsonl

    @property
    def train_records(self) -> list[dict[str, Any]]:
        return [r for r in self.records if "loss" in r]

    @property
    def losses(self) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in self.train_records}


def train_run(run_dir: Path, *overrides: str) -> RunResult:
    """Composes ``experiment=debug`` plus ``overrides`` as Hydra does and trains into ``run_dir``."""
    dcfg = compose_dict(["experiment=debug", *overrides])
    summary = train(to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True), run_dir)  # type: ignore[arg-type]
    return RunResult(summary, read_records(run_dir))


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (training steps, evaluations, events)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def tree_state(root: Path) -> dict[str, str]:
    """Every path under ``root`` with what it holds (a file's sha256, a link's target), to compare byte for byte."""
    state = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            state[name] = f"link -> {path.readlink()}"
        elif path.is_file():
            state[name] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            state[name] = "dir"
    return state


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero)."""
    diff = torch.linalg.vector_norm((got.double() - want.double()).flatten()).item()
    scale = torch.linalg.vector_norm(want.double().flatten()).item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, atol: float = 1e-10) -> None:
    """``||got - want|| <= rel * ||want|| + atol``: relative, so tiny tensors (Adam's second moments) count.

    An elementwise absolute tolerance would pass any tensor whose entries are all below it.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = torch.linalg.vector_norm((got.double() - want.double()).flatten()).item()
    scale = torch.linalg.vector_norm(want.double().flatten()).item()
    assert diff <= rel * scale + atol, f"{what}: relative difference {diff / max(scale, 1e-300):.3e} > {rel:g}"


def train_checkpoint(root: Path, *overrides: str, steps: int = 2) -> Path:
    """Trains ``experiment=debug`` plus ``overrides`` for ``steps`` steps in this process (``single``) and saves
    a checkpoint under ``root``; returns it. No run directory, no console: the cheapest real checkpoint."""
    from moe_trainer.cli import make_engine
    from moe_trainer.config.validate import validate

    cfg = to_dataclass(compose_dict(["experiment=debug", *overrides]))
    validate(cfg)
    engine = make_engine(cfg)
    try:
        if steps:
            engine.train(steps)
        return engine.save(root)
    finally:
        engine.close()
