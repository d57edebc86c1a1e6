"""A trained model read back from a run or a checkpoint of any layout, as one process holds it.

The model's shape comes from the checkpoint's ``meta.json`` (``model``, and ``moe`` in checkpoints
written since export existed), the routing settings of older checkpoints from the run's
``config.yaml`` two levels up; the tokenizer from the checkpoint's own ``tokenizer.json`` (none:
the byte tokenizer). Only the ``model/`` entries are read (DCP reads their bytes, not the
optimizer's), so a checkpoint saved by 4 expert-parallel ranks loads here whole.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import ModelConfig, MoEConfig
from moe_trainer.data.tokenizer import ByteTokenizer, Tokenizer
from moe_trainer.data.tokenizer_file import TOKENIZER_FILE, FileTokenizer
from moe_trainer.hub.weights import fill_model
from moe_trainer.model.transformer import Transformer, active_ffn_hidden, is_moe_block
from moe_trainer.train.checkpoint import META_FILE, checkpoint_problems, list_checkpoints
from moe_trainer.train.checkpoint_io import CheckpointReader

MODEL_PREFIX = "model/"


@dataclass
class TrainedModel:
    checkpoint: Path
    step: int
    model_cfg: ModelConfig
    moe_cfg: MoEConfig
    tokenizer: Tokenizer
    entries: dict[str, Tensor]  # our model's tensors by checkpoint key (no ``model/`` prefix)

    def build(self, device: str | torch.device = "cpu") -> Transformer:
        """The whole model (every expert) in one process, holding the checkpoint's weights, in eval mode."""
        model = Transformer(self.model_cfg, self.moe_cfg, self.tokenizer.vocab_size, seed=0)
        fill_model(model, self.entries.__getitem__)  # every entry: a key the checkpoint lacks is a KeyError
        return model.to(device).eval()


def find_checkpoint(given: str, setting: str) -> Path:
    """A checkpoint directory from what a user gave: itself, or the newest intact one of a run directory.

    A damaged checkpoint given by name is refused; in a run directory damaged ones are skipped (as
    ``train.resume=auto`` does), and a run with none intact is refused.
    """
    path = Path(given).expanduser()
    if (path / META_FILE).is_file():
        problems = checkpoint_problems(path)
        if problems:
            raise ConfigError(setting, given, f"checkpoint is damaged: {'; '.join(problems)}")
        return path
    candidates = [c for root in (path / "checkpoints", path) for c in list_checkpoints(root)]
    if not candidates:
        raise ConfigError(setting, given, "no checkpoint there; give a run directory (holding checkpoints/) or "
                          "one of its checkpoints/step_* directories")
    damaged = []
    for candidate in reversed(candidates):
        problems = checkpoint_problems(candidate)
        if not problems:
            return candidate
        damaged.append(f"{candidate.name}: {'; '.join(problems)}")
    raise ConfigError(setting, given, f"every checkpoint there is damaged ({' | '.join(damaged)})")


def _section(cls: type, values: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names})


def _moe_settings(checkpoint: Path, meta: dict[str, Any], setting: str) -> dict[str, Any]:
    if "moe" in meta:
        return meta["moe"]
    run_config = checkpoint.parent.parent / "config.yaml"
    if not run_config.is_file():
        raise ConfigError(setting, str(checkpoint), "this checkpoint predates recording its routing settings, and "
                          f"its run's config.yaml ({run_config}) is not there to read them from")
    import yaml

    return yaml.safe_load(run_config.read_text())["moe"]


def _tokenizer(checkpoint: Path, setting: str) -> Tokenizer:
    file = checkpoint / TOKENIZER_FILE
    return FileTokenizer.from_file(file, setting) if file.is_file() else ByteTokenizer()


def load_trained(given: str, setting: str = "checkpoint") -> TrainedModel:
    """Reads the model of a run or checkpoint (``setting`` names the argument in messages)."""
    checkpoint = find_checkpoint(given, setting)
    meta = json.loads((checkpoint / META_FILE).read_text())
    model_cfg = _section(ModelConfig, meta["model"])
    moe_cfg = _section(MoEConfig, {**_moe_settings(checkpoint, meta, setting), **meta.get("experts", {})})
    reader = CheckpointReader(checkpoint)
    entries = {key: torch.empty(tuple(shape), dtype=reader.dtypes[key])
               for key, shape in reader.shapes.items() if key.startswith(MODEL_PREFIX)}
    reader.read_into(entries)
    weights = {key.removeprefix(MODEL_PREFIX): t for key, t in entries.items()}
    if model_cfg.arch == "dense":
        moe_cfg = _dense_width_as_saved(model_cfg, moe_cfg, weights)
    return TrainedModel(checkpoint, int(meta["step"]), model_cfg, moe_cfg, _tokenizer(checkpoint, setting), weights)


def _dense_width_as_saved(model_cfg: ModelConfig, moe_cfg: MoEConfig, weights: dict[str, Tensor]) -> MoEConfig:
    """A ``model=dense`` checkpoint's FFN width as its tensors hold it, spelt in ``moe.*`` settings.

    Before 2026-12-04 ``model=dense`` left the router out of the width (``k * expert_hidden``); its
    checkpoints' settings now give a wider FFN than they hold. The MoE positions' width is read from
    the weights and, where it differs, spelt the one way that needs no router: one expert of that width.
    """
    widths = {weights[f"blocks.{i}.ffn.down.weight"].shape[1] for i in range(model_cfg.n_layers)
              if is_moe_block(i, moe_cfg)}
    if len(widths) != 1 or widths == {active_ffn_hidden(moe_cfg)}:
        return moe_cfg
    return replace(moe_cfg, num_experts=1, top_k=1, router="topk", expert_hidden=widths.pop(), num_shared_experts=0)
