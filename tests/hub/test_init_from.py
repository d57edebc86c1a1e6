"""train.init_from and moe-import: a run starts from a transformers checkpoint, upcycled or as saved."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from moe_trainer.cli import make_engine
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.hub.export import export
from moe_trainer.hub.import_cli import import_command
from tests.conftest import compose_dict
from tests.helpers import train_checkpoint


@pytest.fixture(scope="module")
def dense_trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``model=dense`` (FFN width 2 x 32 + round(4 / 3) = 65 in every block) trained 3 steps:
    ``(its checkpoint, its export as Llama)``."""
    root = tmp_path_factory.mktemp("dense")
    checkpoint = train_checkpoint(root / "checkpoints", "model=dense", steps=3)
    export(str(checkpoint), root / "hf")
    return checkpoint, root / "hf"


@pytest.fixture(scope="module")
def dense_export(dense_trained: tuple[Path, Path]) -> Path:
    return dense_trained[1]


def _run(*overrides: str, steps: int) -> tuple[float, list[float]]:
    """``(val_loss before training, the loss of each step)`` of ``experiment=debug`` plus ``overrides``."""
    cfg = to_dataclass(compose_dict(["experiment=debug", *overrides]))
    validate(cfg)
    engine = make_engine(cfg)
    try:
        before = engine.evaluate()
        return before, [r["loss"] for r in engine.train(steps)]
    finally:
        engine.close()


def test_an_upcycled_run_starts_at_the_dense_models_loss_and_trains(dense_export: Path) -> None:
    """Every expert a copy of the FFN and gate weights summing to 1: the MoE block is the dense FFN at the start."""
    dense_val, dense_losses = _run("model=dense", f"train.init_from={dense_export}", steps=1)
    _arch, overrides = import_command(str(dense_export), upcycle=True)
    assert "moe.expert_hidden=65" in overrides and "model.arch=moe" in overrides
    moe_val, moe_losses = _run(*overrides, "moe.num_experts=4", "moe.top_k=2", steps=6)
    assert abs(moe_val - dense_val) <= 1e-4, (moe_val, dense_val)
    assert abs(moe_losses[0] - dense_losses[0]) <= 1e-4, (moe_losses[0], dense_losses[0])  # the same first batch
    assert all(math.isfinite(x) for x in moe_losses)
    assert moe_losses[-1] < moe_losses[0] - 0.05, moe_losses
    print(f"dense {dense_val:.6f} / upcycled {moe_val:.6f} val_loss; upcycled losses {moe_losses}")


def test_the_command_moe_import_prints_is_a_valid_run(dense_export: Path, tmp_path: Path) -> None:
    for upcycle in (False, True):
        _arch, overrides = import_command(str(dense_export), upcycle)
        validate(to_dataclass(compose_dict(["experiment=debug", *overrides])))  # init_from checks included


def test_init_from_starts_where_the_export_left_off(dense_trained: tuple[Path, Path]) -> None:
    """The first val_loss of a run from the export is the exported checkpoint's, loaded as our own checkpoint."""
    checkpoint, hub = dense_trained
    from_hub, _ = _run("model=dense", f"train.init_from={hub}", steps=0)
    cfg = to_dataclass(compose_dict(["experiment=debug", "model=dense"]))
    engine = make_engine(cfg)
    try:
        engine.load(checkpoint)
        from_checkpoint = engine.evaluate()
    finally:
        engine.close()
    fresh, _ = _run("model=dense", steps=0)
    assert from_hub == pytest.approx(from_checkpoint, abs=1e-6) and abs(from_hub - fresh) > 0.01, \
        (from_hub, from_checkpoint, fresh)
