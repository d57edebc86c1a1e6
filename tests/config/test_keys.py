"""The schema is closed: a key it lacks is refused, with the nearest real setting, even when added with ``+``."""

from __future__ import annotations

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.keys import did_you_mean, setting_types
from moe_trainer.config.schema import to_dataclass
from tests.conftest import compose_dict


def test_a_plus_key_hydra_accepts_is_refused_with_the_real_name() -> None:
    cfg = compose_dict(["+moe.num_expert=4"])  # Hydra lets + add it; to_object would drop it silently
    with pytest.raises(ConfigError) as err:
        to_dataclass(cfg)
    assert str(err.value) == "moe.num_expert=4: no such setting; did you mean moe.num_experts?"


def test_a_plus_section_is_refused_at_its_own_name() -> None:
    with pytest.raises(ConfigError) as err:
        to_dataclass(compose_dict(["+optimiser.lr=1"]))
    assert err.value.setting == "optimiser" and err.value.value == {"lr": 1}


@pytest.mark.parametrize("typed,meant", [
    ("moe.num_expert", "moe.num_experts"),
    ("moe.topk", "moe.top_k"),
    ("num_experts", "moe.num_experts"),
    ("moe.num_actors", "parallel.num_actors"),  # the right name in the wrong section
    ("train.learning_rate", None),
])
def test_did_you_mean_uses_the_schemas_full_names(typed: str, meant: str | None) -> None:
    assert did_you_mean(typed, setting_types()) == (f"; did you mean {meant}?" if meant else "")


def test_setting_names_are_the_schema_leaves() -> None:
    names = setting_types()
    assert "moe.num_experts" in names and "data.paths" in names and "moe" not in names
