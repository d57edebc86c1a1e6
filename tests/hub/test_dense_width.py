"""A ``model=dense`` checkpoint from before its width counted the router (2026-12-04) still exports and generates.

Such a checkpoint's settings now spell a wider FFN than its tensors hold: ``moe-export`` reads the width
from the tensors, and a resume is refused by name rather than by a shape error deep in the load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import to_dataclass
from moe_trainer.data.tokenizer import ByteTokenizer
from moe_trainer.engine import checkpoint_signature
from moe_trainer.hub.export import export
from moe_trainer.hub.trained_model import load_trained
from moe_trainer.train.checkpoint import DENSE_WIDTH_KEY, META_FILE, check_checkpoint
from tests.conftest import compose_dict
from tests.helpers import train_checkpoint


@pytest.fixture(scope="module")
def legacy_dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The debug experiment's dense model as saved before the change: 4 experts of 32, top-2 meant 64 wide (now 65).

    Trained as the one spelling that is 64 wide today (one expert of 64), its metadata then rewritten to
    the settings it was saved with before, and without the width that checkpoints record since."""
    checkpoint = train_checkpoint(tmp_path_factory.mktemp("legacy") / "checkpoints", "model=dense",
                                  "moe.num_experts=1", "moe.top_k=1", "moe.expert_hidden=64")
    meta = json.loads((checkpoint / META_FILE).read_text())
    assert meta["experts"].pop(DENSE_WIDTH_KEY) == 64
    meta["moe"].update(num_experts=4, top_k=2, expert_hidden=32)
    meta["experts"].update(num_experts=4, expert_hidden=32)
    (checkpoint / META_FILE).write_text(json.dumps(meta))
    return checkpoint


def test_a_legacy_dense_checkpoint_exports_at_the_width_its_tensors_hold(legacy_dense: Path, tmp_path: Path) -> None:
    trained = load_trained(str(legacy_dense))
    assert (trained.moe_cfg.num_experts, trained.moe_cfg.top_k, trained.moe_cfg.expert_hidden) == (1, 1, 64)
    export(str(legacy_dense), tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["intermediate_size"] == 64


def test_a_legacy_dense_checkpoint_is_refused_by_name_on_resume(legacy_dense: Path) -> None:
    cfg = to_dataclass(compose_dict(["experiment=debug", "model=dense"]))
    with pytest.raises(ConfigError, match="before 2026-12-04, when model=dense left the router out") as err:
        check_checkpoint(legacy_dense, checkpoint_signature(cfg, ByteTokenizer()))
    assert "this run's is 65" in str(err.value)


def test_a_dense_checkpoint_of_today_records_its_width_and_resumes() -> None:
    cfg = to_dataclass(compose_dict(["experiment=debug", "model=dense"]))
    assert checkpoint_signature(cfg, ByteTokenizer())["experts"][DENSE_WIDTH_KEY] == 2 * 32 + round(4 / 3)
    moe = to_dataclass(compose_dict(["experiment=debug"]))
    assert DENSE_WIDTH_KEY not in checkpoint_signature(moe, ByteTokenizer())["experts"]
