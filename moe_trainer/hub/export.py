"""``moe-export RUN_OR_CHECKPOINT OUT_DIR``: a trained model as a ``transformers`` model directory.

Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards and their
index), the tokenizer files and a short ``README.md``, all into a temporary directory beside
``OUT_DIR`` that is renamed into place at the end: an export that fails (an unsupported router,
a damaged checkpoint, a full disk) leaves nothing behind. ``OUT_DIR`` may be missing or an
empty directory, never one with files in it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

import torch
from torch import Tensor

from moe_trainer.config.errors import ConfigError, first_line
from moe_trainer.hub.architectures import Unsupported, hf_config, target_architecture
from moe_trainer.hub.safetensors_io import DEFAULT_SHARD_BYTES, write_weights
from moe_trainer.hub.tokenizer_files import write_tokenizer
from moe_trainer.hub.trained_model import TrainedModel, load_trained
from moe_trainer.hub.weights import links_for

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SOURCE = "RUN_OR_CHECKPOINT"


def hub_tensors(trained: TrainedModel, arch: str, dtype: torch.dtype) -> dict[str, Tensor]:
    """Every Hub tensor of ``arch`` from the trained model's entries; each of ours is used exactly once.

    The router's selection bias is the only state with no link: it is refused unless zero
    (``moe.bias_balancing`` is refused before this, so it is).
    """
    links, fixed = links_for(arch, trained.model_cfg, trained.moe_cfg)
    out: dict[str, Tensor] = {}
    for link in links:
        for name, tensor in zip(link.hf, link.to_hf(trained.entries[link.ours]), strict=True):
            out[name] = tensor.to(dtype).contiguous()
    for f in fixed:
        out[f.hf] = f.value().to(dtype)
    linked = {link.ours for link in links}
    for key, tensor in trained.entries.items():
        if key in linked:
            continue
        if key.endswith("router.expert_bias") and not tensor.any():
            continue
        raise Unsupported(f"{key} has no counterpart in {arch}")
    return out


def _generation_config(eos_id: int) -> dict[str, object]:
    """moe-generate's defaults; the end-of-document token ends a generation (and pads a batch of them)."""
    return {"eos_token_id": eos_id, "bos_token_id": None, "pad_token_id": eos_id, "do_sample": True,
            "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def _readme(trained: TrainedModel, arch: str, files: list[str]) -> str:
    return (f"# Exported by moe-export\n\n{arch}, from `{trained.checkpoint}` (step {trained.step}), tokenizer "
            f"`{trained.tokenizer.name}`.\n\nFiles: {', '.join(sorted(files))}.\n\n"
            "Load it with `transformers.AutoModelForCausalLM.from_pretrained(THIS_DIRECTORY)`; evaluate it with "
            "lm-evaluation-harness as docs/user-guide.md of moe-trainer shows.\n")


def refuse_occupied(out_dir: Path) -> None:
    """The output directory must not exist or be empty: an export never mixes with other files."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        what = "is a file" if not out_dir.is_dir() else "exists and is not empty"
        raise ConfigError("OUT_DIR", str(out_dir), f"{what}; give a new directory (or an empty one), so the export "
                          "never mixes with other files")


def export(source: str, out_dir: Path, dtype: str = "float32", dropless: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[str, TrainedModel, list[str]]:
    """Exports a run's or checkpoint's model; returns ``(architecture, the model read, files written)``.

    Raises ConfigError (a bad argument, a damaged checkpoint) or Unsupported, before writing anything.
    """
    out_dir = out_dir.resolve()  # "." and friends: the rename needs a real name
    refuse_occupied(out_dir)
    trained = load_trained(source, SOURCE)
    arch, files = write_export(trained, out_dir, dtype, dropless, max_shard_bytes)
    return arch, trained, files


def write_export(trained: TrainedModel, out_dir: Path, dtype: str = "float32", dropless: bool = False,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[str, list[str]]:
    """Writes ``trained`` as a transformers model directory; returns ``(architecture, files written)``."""
    refuse_occupied(out_dir)
    arch = target_architecture(trained.model_cfg, trained.moe_cfg, dropless=dropless)
    tensors = hub_tensors(trained, arch, DTYPES[dtype])
    tok = trained.tokenizer
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = hf_config(arch, trained.model_cfg, trained.moe_cfg, tok.vocab_size, tok.eod_id, dtype)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(_generation_config(tok.eod_id), indent=2))
        files = ["config.json", "generation_config.json", *write_weights(tmp, tensors, max_shard_bytes),
                 *write_tokenizer(tmp, tok, trained.model_cfg.max_seq_len), "README.md"]
        (tmp / "README.md").write_text(_readme(trained, arch, files))
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return arch, files


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-export", description="Export a trained model as a Hugging Face "
                                "transformers model directory (Mixtral, Qwen2-MoE or Llama).")
    p.add_argument("source", metavar=SOURCE, help="a run directory (its newest intact checkpoint) or a "
                   "checkpoints/step_* directory")
    p.add_argument("out_dir", metavar="OUT_DIR", type=Path, help="a new (or empty) directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the saved weights (bfloat16 rounds the fp32 masters; default float32)")
    p.add_argument("--dropless", action="store_true", help="export a model trained with moe.capacity_factor as "
                   "the dropless model transformers runs")
    p.add_argument("--max-shard-size", type=int, default=DEFAULT_SHARD_BYTES, metavar="BYTES",
                   help="largest safetensors file (default 5 GiB)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        arch, trained, files = export(args.source, args.out_dir, args.dtype, args.dropless, args.max_shard_size)
    except ConfigError as err:
        print(f"moe-export: {err}", file=sys.stderr)
        sys.exit(2)
    except Unsupported as err:
        print(f"moe-export: cannot export {args.source} faithfully: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk, no permission: nothing was left behind
        print(f"moe-export: cannot write {args.out_dir}: {first_line(err)}", file=sys.stderr)
        sys.exit(1)
    size = sum((args.out_dir / f).stat().st_size for f in files)
    print(f"moe-export: wrote {args.out_dir} ({arch}, {len(files)} files, {size / 1e6:.1f} MB) from "
          f"{trained.checkpoint} (step {trained.step})")


if __name__ == "__main__":
    main()
