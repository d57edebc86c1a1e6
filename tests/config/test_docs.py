"""docs/config.md documents every setting of the schema, its default and what each ``parallel=`` preset sets.

Defaults and the preset table are checked against the configs Hydra composes, so they cannot go
stale: ``python -m tests.config.test_docs`` prints the preset table for pasting.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

from omegaconf import OmegaConf

from moe_trainer.config.schema import STRATEGIES, Config, ParallelConfig, to_dataclass
from moe_trainer.config.validate import data_parallel_ranks
from moe_trainer.parallel.resources import role_resources
from moe_trainer.parallel.setup import ep_size, roles, world_size
from tests.conftest import compose_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_every_schema_field_is_documented() -> None:
    text = DOC.read_text()
    for group, group_type in typing.get_type_hints(Config).items():
        for field in dataclasses.fields(group_type):
            assert f"`{group}.{field.name}`" in text, f"{group}.{field.name} missing from docs/config.md"


def _documents(cell: str, value: object) -> bool:
    """Whether a default cell of docs/config.md, as written on the command line, is ``value``."""
    if not isinstance(value, int | float) or isinstance(value, bool):  # null, true, a string, a list
        return cell == _as_typed(value).strip("'")
    try:
        return float(cell.replace("_", "")) == value
    except ValueError:
        return False


def test_every_documented_default_is_what_moe_train_composes() -> None:
    """The default column holds ``moe-train``'s defaults (conf/), which is what a run gets, not the schema's."""
    composed = compose_dict([])
    rows = re.findall(r"^\| `(\w+)\.(\w+)` \| `([^`]*)` \|", DOC.read_text(), re.M)
    fields = {f"{group}.{field.name}" for group, group_type in typing.get_type_hints(Config).items()
              for field in dataclasses.fields(group_type)}
    # every setting's default is checked but data.token_cache's, which depends on $MOE_TRAINER_CACHE (its row says so)
    assert {f"{group}.{key}" for group, key, _ in rows} >= fields - {"data.token_cache"}
    wrong = [f"{group}.{key}: {cell} (composed: {_as_typed(composed[group][key])})" for group, key, cell in rows
             if not _documents(cell, composed[group][key])]
    assert not wrong, "docs/config.md's default column differs from conf/: " + "; ".join(wrong)


def _as_typed(value: object) -> str:
    """A value as it is written on the command line (``null``, ``true``, ``0.5``)."""
    return OmegaConf.to_yaml({"v": value}).split(":", 1)[1].strip()


def preset_table() -> str:
    """``parallel.*`` as Hydra composes it for each ``parallel=`` preset, one column each, and what follows.

    The last rows are derived by the functions the runtime uses (actors started, ranks,
    expert-parallel size), so they say what a preset really starts.
    """
    composed = {name: compose_dict([f"parallel={name}"]) for name in STRATEGIES}
    typed = {name: to_dataclass(dcfg) for name, dcfg in composed.items()}
    lines = ["| setting | " + " | ".join(f"`parallel={name}`" for name in STRATEGIES) + " |",
             "|---|" + "---|" * len(STRATEGIES)]
    for field in dataclasses.fields(ParallelConfig):
        values = " | ".join(f"`{_as_typed(composed[name].parallel[field.name])}`" for name in STRATEGIES)
        lines.append(f"| `parallel.{field.name}` | {values} |")
    actors = {name: 0 if name == "single" else world_size(cfg) for name, cfg in typed.items()}
    derived = {
        "Ray actors started": actors,
        "CPUs reserved": {name: 0 if name == "single" else sum(r.actors * r.cpus for r in role_resources(cfg))
                          for name, cfg in typed.items()},
        "data-parallel ranks": {name: data_parallel_ranks(cfg) for name, cfg in typed.items()},
        "experts per expert-holding rank": {
            name: roles(cfg).experts_per_actor if name == "disaggregated" else cfg.moe.num_experts // ep_size(cfg)
            for name, cfg in typed.items()},
    }
    for what, values in derived.items():
        lines.append(f"| *{what}* | " + " | ".join(f"{values[name]:g}" for name in STRATEGIES) + " |")
    return "\n".join(lines)


def test_preset_table_matches_what_hydra_composes() -> None:
    table = preset_table()
    assert table in DOC.read_text(), (
        "docs/config.md's parallel preset table differs from the composed presets; "
        f"replace it with (python -m tests.config.test_docs):\n{table}")


if __name__ == "__main__":
    print(preset_table())
