"""Every config in conf/ composes against the schema; overrides reach the typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from moe_trainer.cli import CONF_DIR
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate
from tests.conftest import compose_dict

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


@pytest.mark.parametrize(
    "override",
    [f"{group}={option.stem}" for group in GROUPS for option in sorted((Path(CONF_DIR) / group).glob("*.yaml"))],
)
def test_every_option_composes(override: str) -> None:
    extra = ["data.paths=[README.md]"] if override == "data=files" else []
    cfg = to_dataclass(compose_dict([override, *extra]))
    assert cfg.model.d_model > 0


def test_defaults_are_valid_and_fine_grained() -> None:
    cfg = to_dataclass(compose_dict([]))
    validate(cfg)
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.parallel.strategy) == (64, 8, "single")
    assert cfg.moe.capacity_factor is None and cfg.moe.bias_balancing


def test_overrides_reach_the_typed_config() -> None:
    cfg = to_dataclass(compose_dict(["moe.num_experts=16", "moe.top_k=1", "moe.capacity_factor=1.25",
                                     "model=dense", "train.max_steps=7"]))
    assert (cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor) == (16, 1, 1.25)
    assert cfg.model.arch == "dense" and cfg.train.max_steps == 7


def test_unknown_key_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException) as err:
        compose_dict(["moe.topk=2"])
    assert isinstance(err.value.__cause__, ConfigKeyError | ValidationError) or "topk" in str(err.value)


def test_wrong_type_fails_at_composition() -> None:
    with pytest.raises(ConfigCompositionException):
        compose_dict(["moe.top_k=two"])
