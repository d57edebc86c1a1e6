"""Engine facts: parameter counts come from a model built on the ``meta`` device, equal to a real one's."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moe_trainer.config.schema import Config
from moe_trainer.engine import build_model, model_parameter_counts
from moe_trainer.model.transformer import count_parameters

VOCAB = 257


@pytest.mark.parametrize("overrides", [
    [],
    ["model=dense"],
    ["moe.num_shared_experts=2", "moe.shared_expert_hidden=16"],
    ["model.n_layers=4", "moe.every=2"],
    ["moe.router=switch", "moe.num_experts=8"],
], ids=["moe", "dense", "shared_experts", "every_2", "switch_8_experts"])
def test_meta_counts_equal_a_built_model(make_config: Callable[..., Config], overrides: list[str]) -> None:
    cfg = make_config(*overrides)
    real = count_parameters(build_model(cfg, VOCAB))
    assert model_parameter_counts(cfg, VOCAB) == {"params_total": real.total, "params_active": real.active,
                                                  "params_experts": real.experts}


def test_mixtral_shape_is_counted_without_allocating(make_config: Callable[..., Config]) -> None:
    """47 billion fp32 parameters (~190 GB) could not be built here: only shapes are."""
    d, f, layers, experts = 4096, 14336, 32, 8
    cfg = make_config(f"model.d_model={d}", f"model.n_layers={layers}", "model.n_heads=32",
                      f"moe.num_experts={experts}", f"moe.expert_hidden={f}")
    counts = model_parameter_counts(cfg, VOCAB)
    per_layer_dense = 4 * d * d + experts * d + 2 * d  # attention, router, two norms
    assert counts["params_experts"] == layers * experts * 3 * d * f
    assert counts["params_total"] == counts["params_experts"] + layers * per_layer_dense + 2 * VOCAB * d + d
    assert counts["params_active"] == counts["params_total"] - layers * (experts - 2) * 3 * d * f
