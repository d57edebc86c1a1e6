"""The schema's own setting names: the closed set every key of a composed config must belong to.

Hydra refuses ``moe.num_expert=4`` but lets ``+moe.num_expert=4`` add the key (``+`` opens the
struct), and ``OmegaConf.to_object`` then drops it silently: the run trains with the default.
:func:`check_known_keys` closes that gap on the composed config, and :func:`unknown_setting`
words the refusal with the nearest real name, for the command-line check and this one alike.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from functools import cache
from typing import Any

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config

HYDRA_KEY = "hydra"  # Hydra's own node: checked by Hydra against its own schema


@cache
def setting_types() -> dict[str, Any]:
    """Returns every leaf setting's full dotted name (``moe.num_experts``) and its annotated type."""
    found: dict[str, Any] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name]
            if dataclasses.is_dataclass(kind):
                walk(kind, f"{prefix}{f.name}.")  # type: ignore[arg-type]
            else:
                found[f"{prefix}{f.name}"] = kind

    walk(Config, "")
    return found


def sections() -> set[str]:
    """Returns the top-level sections (``model``, ``moe``, ...), which are also the config groups."""
    return {f.name for f in dataclasses.fields(Config)}


def is_list_setting(key: str) -> bool:
    """Whether the setting `key` holds a list (``data.paths``, ``logger.tags``)."""
    return typing.get_origin(setting_types().get(key)) is list


def did_you_mean(key: str, names: typing.Iterable[str]) -> str:
    """Returns ``"; did you mean X?"`` for the name closest to `key`, or ``""`` when none is close.

    A typo is looked for within the key's own section first (``moe.num_expert``), then the same
    name in another section (``moe.num_actors`` -> ``parallel.num_actors``), then across full
    names with a stricter cutoff: the shared ``train.`` of ``train.learning_rate`` and
    ``train.min_lr_ratio`` must not make them look alike.
    """
    names = list(names)
    section, _, leaf = key.rpartition(".")
    siblings = {n.rpartition(".")[2]: n for n in names if n.rpartition(".")[0] == section}
    close = [siblings[m] for m in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)]
    close = close or [n for n in names if n.rpartition(".")[2] == leaf][:1]
    close = close or difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def unknown_setting(key: str, value: object) -> ConfigError:
    """The refusal of a key the schema does not have, with the nearest real setting."""
    return ConfigError(key, value, "no such setting" + did_you_mean(key, setting_types()))


def check_known_keys(cfg: Any) -> None:
    """Raises :class:`ConfigError` for the first key of composed `cfg` that the schema lacks.

    Walks the ``DictConfig`` itself (unresolved, no interpolation is evaluated); Hydra's own
    ``hydra`` node is left to Hydra.
    """
    from omegaconf import DictConfig

    known = setting_types()

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node.keys():
            key = f"{prefix}{name}"
            if key == HYDRA_KEY:
                continue
            child = node._get_node(name)
            if isinstance(child, DictConfig) and key not in known:
                if not any(k.startswith(f"{key}.") for k in known):
                    raise unknown_setting(key, _plain(child))
                walk(child, f"{key}.")
            elif key not in known:
                raise unknown_setting(key, _plain(child))

    walk(cfg, "")


def _plain(node: Any) -> object:
    """Returns a config node as plain Python, unresolved, for an error message."""
    from omegaconf import Container, OmegaConf

    if isinstance(node, Container):
        return OmegaConf.to_container(node, resolve=False)
    return node._value() if hasattr(node, "_value") else node
