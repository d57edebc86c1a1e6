"""The memory each rank may use, and what an over-budget config is told."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config
from moe_trainer.config.validate import validate
from moe_trainer.plan import budget as budget_module
from moe_trainer.plan.budget import GIB, budget, check_fits
from moe_trainer.plan.memory_plan import build_plan


def test_the_budget_per_rank(make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "_machine_memory", lambda: 12 * GIB)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert budget(make_config("parallel.memory_per_actor_gb=1.5")).bytes == int(1.5 * GIB)  # type: ignore[union-attr]
    assert budget(make_config()).bytes == 12 * GIB  # type: ignore[union-attr]  # single: the one process
    # a Ray strategy on the embedded cluster: the actors and the driver share the machine
    assert budget(make_config("parallel=expert_parallel", "parallel.num_actors=2")).bytes == 4 * GIB  # type: ignore
    assert budget(make_config("parallel=disaggregated")).bytes == 3 * GIB  # type: ignore[union-attr]
    # an existing cluster's nodes are not this machine: only an explicit budget is checked
    assert budget(make_config("parallel=expert_parallel", "cluster.address=10.0.0.1:6379")) is None
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert budget(make_config("parallel=expert_parallel")) is None
    assert budget(make_config("parallel=expert_parallel", "parallel.memory_per_actor_gb=2")) is not None


@pytest.mark.parametrize("value", [0, -1])
def test_a_budget_of_zero_or_less_is_refused_by_name(make_config: Callable[..., Config], value: int) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_config(f"parallel.memory_per_actor_gb={value}"))
    assert err.value.setting == "parallel.memory_per_actor_gb" and "must be > 0" in str(err.value)


def test_an_over_budget_config_is_refused_with_its_plan_and_fixes_that_fit(
        make_config: Callable[..., Config]) -> None:
    heavy = ("parallel=expert_parallel", "parallel.num_actors=2", "model.max_seq_len=512", "data.seq_len=512",
             "train.batch_size=64")
    none = build_plan(make_config(*heavy)).largest().total
    block = build_plan(make_config(*heavy, "train.recompute=block")).largest().total
    cfg = make_config(*heavy, f"parallel.memory_per_actor_gb={(none + block) / 2 / GIB:.4f}")
    with pytest.raises(ConfigError) as err:
        check_fits(cfg)
    message = str(err.value)
    assert "ranks 0-1 (actor): params" in message and "activations (none)" in message
    assert {"train.recompute": "block"} in err.value.fixes
    for fix in err.value.fixes:  # each suggested change fits
        changed = make_config(*heavy, f"parallel.memory_per_actor_gb={(none + block) / 2 / GIB:.4f}",
                              *(f"{k}={v}" for k, v in fix.items()))
        check_fits(changed)
