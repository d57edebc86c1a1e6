"""Run dirs shared by the report tests: real single-process ``moe-train`` runs (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_trainer.cli import train
from moe_trainer.config.schema import to_dataclass
from tests.conftest import compose_dict

STEPS = 10
VARIANTS = {"base": [], "capacity": ["moe.capacity_factor=1.0"], "experts8": ["moe.num_experts=8"]}


def train_run(overrides: list[str], run_dir: Path) -> Path:
    """A real single-process run of the debug experiment with ``overrides``, written into ``run_dir``."""
    dcfg = compose_dict(["experiment=debug", *overrides])
    train(to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True), run_dir)  # type: ignore[arg-type]
    return run_dir


@pytest.fixture(scope="package")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real single-process runs that differ in one MoE setting each."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, overrides in VARIANTS.items():
        dirs[name] = train_run([f"train.max_steps={STEPS}", "train.eval_every=5", *overrides], root / name)
    return dirs


