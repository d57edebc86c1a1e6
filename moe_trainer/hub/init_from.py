"""``train.init_from=PATH``: a run starts from a local ``transformers`` checkpoint instead of a random init.

Supported: ``MixtralForCausalLM`` and ``Qwen2MoeForCausalLM`` into ``model=moe`` (continued
pre-training), ``LlamaForCausalLM``/``MistralForCausalLM`` into ``model=dense``, and a dense
checkpoint *upcycled* into ``model=moe`` (Komatsuzaki et al., https://arxiv.org/abs/2212.05055):
every expert of an MoE block starts as a copy of that block's FFN, the router keeps the run's
own initialisation (normal, std ``model.init_std``, seeded by ``train.seed``), and since the k
gate weights sum to 1 (required) the upcycled block computes exactly the dense FFN: the run
starts at the dense model's loss.

Checked by :func:`check_init_from` with the other settings, before any actor starts or anything
is written: the architecture, every setting the checkpoint's shapes fix (the message names the
setting and the value to give it; ``moe-import PATH`` prints them all), the tokenizer, every
tensor's presence and shape. Then every process fills its own parameters with
:func:`apply_init_from` as it builds its model, reading only its own experts' tensors, so any
strategy shards the experts as usual. ``train.resume`` wins over it: a resumed run loads its
checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from moe_trainer.config.errors import ConfigError, first_line
from moe_trainer.config.schema import Config
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE
from moe_trainer.hub.architectures import (
    DENSE_ARCHITECTURES,
    Requirement,
    Unsupported,
    architecture_of,
    requirements,
    with_defaults,
)
from moe_trainer.hub.safetensors_io import FLOAT_DTYPES, HubWeights, read_errors
from moe_trainer.hub.tokenizer_files import is_byte_tokenizer, tokenizer_content
from moe_trainer.hub.weights import Fixed, Link, fill_model, links_for, upcycled_links

SETTING = "train.init_from"


def read_hub_config(path: str, setting: str = SETTING) -> dict[str, Any]:
    """``PATH/config.json`` as written (transformers' defaults are added where it is read:
    :func:`~moe_trainer.hub.architectures.with_defaults`); a ConfigError naming ``setting`` if absent."""
    directory = Path(path).expanduser()
    file = directory / "config.json"
    if not file.is_file():
        raise ConfigError(setting, path, "is not a transformers model directory (no config.json there); give the "
                          "local directory of a saved model (what moe-export or save_pretrained writes)")
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(setting, path, f"config.json is unreadable ({err})") from err


@contextmanager
def refused_as_setting(path: str, setting: str = SETTING) -> Iterator[None]:
    """A checkpoint we cannot read (:class:`Unsupported`, a config without a key it needs) as one ConfigError."""
    try:
        yield
    except Unsupported as err:
        raise ConfigError(setting, path, f"cannot start from this checkpoint: {err}") from err
    except KeyError as err:
        raise ConfigError(setting, path, f"config.json lacks {err} (a damaged or foreign config?)") from err


def is_upcycling(hf: dict[str, Any], cfg: Config) -> bool:
    """A dense checkpoint into ``model=moe``."""
    return architecture_of(hf) in DENSE_ARCHITECTURES and cfg.model.arch == "moe"


def hub_requirements(path: str, hf: dict[str, Any], upcycle: bool, setting: str = SETTING) -> list[Requirement]:
    """The settings the checkpoint at ``path`` needs, or a ConfigError naming ``setting`` when it cannot be read."""
    with refused_as_setting(path, setting):
        return requirements(hf, upcycle)


def _links(hf: dict[str, Any], cfg: Config, upcycle: bool) -> tuple[list[Link], list[Fixed]]:
    """The links of this run's model to the checkpoint ``hf`` (its config as written)."""
    arch = architecture_of(hf)
    if upcycle:
        return upcycled_links(arch, cfg.model, cfg.moe), []
    return links_for(arch, cfg.model, cfg.moe, qkv_bias=bool(with_defaults(hf).get("qkv_bias")))


def tokenizer_override(path: str) -> str | None:
    """The ``data.tokenizer`` a checkpoint's tokens need: ``byte`` for an exported byte model, its own file
    otherwise; None when the directory holds no tokenizer.json."""
    file = Path(path).expanduser() / TOKENIZER_FILE
    if not file.is_file():
        return None
    return "byte" if is_byte_tokenizer(file) else str(file)


def _check_tokenizer(cfg: Config, path: str, hf: dict[str, Any]) -> None:
    wanted = tokenizer_override(path)
    have = cfg.data.tokenizer
    if have == "bpe":
        raise ConfigError(SETTING, path, "cannot start with data.tokenizer=bpe: a BPE trained here numbers its "
                          "tokens its own way, and the checkpoint's embedding rows mean its tokenizer's ids; give "
                          f"data.tokenizer={wanted or 'PATH/tokenizer.json'}")
    if wanted is not None:
        if wanted == "byte":
            same = have == "byte"
        else:
            theirs = tokenizer_content(Path(wanted))
            same = have != "byte" and theirs is not None and tokenizer_content(Path(have)) == theirs
        if not same:
            raise ConfigError(SETTING, path, f"its tokens are those of {wanted}, this run has data.tokenizer={have}; "
                              f"give data.tokenizer={wanted}")
    from moe_trainer.data.tokenizer import build_tokenizer

    vocab = build_tokenizer(have).vocab_size
    if hf.get("vocab_size") != vocab:
        raise ConfigError(SETTING, path, f"its vocab_size is {hf.get('vocab_size')}, this run's tokenizer "
                          f"(data.tokenizer={have}) has {vocab} ids; give the tokenizer it was trained with")


def _expected_entries(cfg: Config, vocab_size: int) -> dict[str, torch.Size]:
    """Shapes of the full model's entries (every expert), from a model on the meta device (no memory)."""
    from moe_trainer.model.transformer import Transformer
    from moe_trainer.train.sharded_checkpoint import model_entries

    with torch.device("meta"):
        model = Transformer(cfg.model, cfg.moe, vocab_size, cfg.train.seed)
    return {key: t.shape for key, t in model_entries(model).items()}


def _has_no_counterpart(key: str, upcycle: bool) -> bool:
    """State of ours no checkpoint initialises: the selection bias (zeros) and an upcycled router (the run's own)."""
    return key.endswith("router.expert_bias") or (upcycle and key.endswith("router.weight"))


def _check_tensors(cfg: Config, path: str, hf: dict[str, Any], upcycle: bool) -> None:
    """Every tensor our model needs is there, of a float dtype and the right shape; every tensor there is used;
    the Hub-only tensors hold the values that make the model ours."""
    weights = HubWeights(Path(path).expanduser())
    links, fixed = _links(hf, cfg, upcycle)
    tied = _tied(hf)
    by_ours = {link.ours: link for link in links}
    used = {f.hf for f in fixed}
    for key, shape in _expected_entries(cfg, hf["vocab_size"]).items():
        link = by_ours.get(key)
        if link is None:
            if _has_no_counterpart(key, upcycle):
                continue
            raise ConfigError(SETTING, path, f"nothing in it initialises {key}")
        names = tuple(_resolved(n, tied) for n in link.hf)
        used.update(names)
        for name in names:
            if name not in weights:
                raise ConfigError(SETTING, path, f"{name} is missing from its safetensors (a partial checkpoint?)")
            if weights.dtype(name) not in FLOAT_DTYPES:
                raise ConfigError(SETTING, path, f"{name} is stored as {weights.dtype(name)}; give weights in "
                                  f"one of {', '.join(FLOAT_DTYPES)} (not quantized)")
        try:
            got = link.from_hf(tuple(torch.empty(weights.shape(n), device="meta") for n in names)).shape
        except RuntimeError:  # parts that do not even fit together
            got = torch.Size([-1])
        if got != shape:
            shapes = ", ".join(f"{n} {weights.shape(n)}" for n in names)
            raise ConfigError(SETTING, path, f"{shapes} cannot give {key} the shape {list(shape)} this run's model "
                              "has")
    for f in fixed:
        if f.hf not in weights or not torch.equal(weights.get(f.hf).float(), f.value()):
            raise ConfigError(SETTING, path, f"cannot start from this checkpoint: {f.why} ({f.hf} is not)")
    tied_head = {"lm_head.weight"} if tied else set()
    unused = sorted(set(weights.files) - used - tied_head)
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        raise ConfigError(SETTING, path, f"cannot start from this checkpoint: {', '.join(unused[:3])}{more} have no "
                          "counterpart in our model (dropping them would change what it computes)")


def _tied(hf: dict[str, Any]) -> bool:
    return bool(with_defaults(hf)["tie_word_embeddings"])


def _resolved(name: str, tied: bool) -> str:
    """Tied embeddings: the output projection is the input embedding (transformers ignores a saved lm_head)."""
    return "model.embed_tokens.weight" if name == "lm_head.weight" and tied else name


def check_init_from(cfg: Config) -> None:
    """Every check of ``train.init_from`` that needs no process of the run (validation, before anything starts)."""
    path = cfg.train.init_from
    if not path:
        return
    hf = read_hub_config(path)
    with refused_as_setting(path):
        upcycle = is_upcycling(hf, cfg)
    for req in hub_requirements(path, hf, upcycle):
        if not req.met_by(cfg):
            raise ConfigError(SETTING, path, f"{req.source} needs {' '.join(req.overrides())}; this run has "
                              f"{req.current(cfg)} (moe-import {path} prints every setting it needs)")
    _check_tokenizer(cfg, path, hf)
    try:
        _check_tensors(cfg, path, hf, upcycle)
    except ConfigError:
        raise
    except read_errors() as err:
        raise ConfigError(SETTING, path, f"its weights cannot be read ({first_line(err, with_type=True)}); a "
                          "damaged or partial checkpoint?") from err


def apply_init_from(model: nn.Module, cfg: Config) -> None:
    """Fills ``model``'s parameters (whatever shard of experts it holds) from ``train.init_from``.

    A no-op without the setting and for a model on the meta device (shapes only). Only the
    tensors of this model's parameters are read; the checks were made by :func:`check_init_from`.
    """
    path = cfg.train.init_from
    if not path or any(p.is_meta for p in model.parameters()):
        return
    hf = read_hub_config(path)
    weights = HubWeights(Path(path).expanduser())
    links, _ = _links(hf, cfg, is_upcycling(hf, cfg))
    tied = _tied(hf)
    by_ours = {link.ours: link for link in links}

    def value(key: str) -> torch.Tensor | None:
        link = by_ours.get(key)
        return None if link is None else link.from_hf(tuple(weights.get(_resolved(n, tied)) for n in link.hf))

    fill_model(model, value)


def describe(path: str, cfg: Config) -> str:
    """One line for the console: what the run starts from."""
    hf = read_hub_config(path)
    how = "upcycled: every expert a copy of its block's FFN" if is_upcycling(hf, cfg) else "weights as saved"
    return f"starting from {path} ({architecture_of(hf)}, {how})"
