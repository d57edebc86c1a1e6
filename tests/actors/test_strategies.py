"""Ray strategies: bad input stops before any actor starts.

That tokens really cross ranks under expert_parallel, that its experts are really sharded and that
data_parallel replicates them and moves no tokens: asserted on the runs of the strategy comparison's
sweep (tests/test_compare.py), one ``moe-train`` of each strategy there, not a second one here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import ray

from moe_trainer.config.errors import ConfigError
from tests.helpers import train_run

FAST = ["train.max_steps=3", "train.eval_every=3", "train.checkpoint_every=0", "train.log_every=1",
        "parallel.cpus_per_actor=0.5"]


def run(run_dir: Path, *overrides: str) -> None:
    """Every test here expects a refusal before any actor starts."""
    train_run(run_dir, *FAST, *overrides)


@pytest.mark.parametrize(
    "overrides,setting",
    [
        (["parallel=expert_parallel", "parallel.num_actors=2", "moe.num_experts=5"], "moe.num_experts"),
        (["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=3"], "parallel.ep_size"),
        (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.ep_size=4"], "parallel.ep_size"),
        (["parallel=data_parallel", "parallel.num_actors=3"], "train.batch_size"),
    ],
)
def test_bad_parallel_settings_fail_before_any_actor(tmp_path: Path, overrides: list[str], setting: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(tmp_path, *overrides)
    assert err.value.setting == setting
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "overrides,setting,available",
    [
        (["parallel.num_actors=16"], "parallel.num_actors", "has 4"),
        (["parallel.num_actors=2", "parallel.gpus_per_actor=1"], "parallel.gpus_per_actor", "has 0"),
    ],
)
def test_more_than_the_cluster_has_says_what_is_available(ray_cluster: object, tmp_path: Path,
                                                          overrides: list[str], setting: str, available: str) -> None:
    with pytest.raises(ConfigError) as err:
        run(tmp_path, "parallel=data_parallel", "train.batch_size=16", *overrides)
    assert err.value.setting == setting and available in str(err.value)
    assert not (tmp_path / "metrics.jsonl").exists()
    assert ray.available_resources().get("CPU") == ray.cluster_resources().get("CPU")  # no actor was started
