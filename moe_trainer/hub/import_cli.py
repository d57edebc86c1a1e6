"""``moe-import PATH [--upcycle]``: the ``moe-train`` command that starts from a ``transformers`` checkpoint.

Reads ``PATH/config.json`` (nothing else is needed) and prints every setting its shapes fix
(:func:`moe_trainer.hub.architectures.requirements`, the same list ``train.init_from`` checks),
the tokenizer, and the command line. ``--upcycle`` turns a dense checkpoint into ``model=moe``
(experts copied from the FFN); the number of experts and k stay yours (``moe.num_experts``,
``moe.top_k``). Exit code 2 with one line for a checkpoint that cannot be read.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from moe_trainer.config.errors import ConfigError
from moe_trainer.hub.architectures import DENSE_ARCHITECTURES, architecture_of
from moe_trainer.hub.init_from import hub_requirements, read_hub_config, refused_as_setting, tokenizer_override

SETTING = "PATH"


def import_command(path: str, upcycle: bool) -> tuple[str, list[str]]:
    """``(architecture, the moe-train overrides)`` for starting from ``path``."""
    hf = read_hub_config(path, SETTING)
    with refused_as_setting(path, SETTING):
        arch = architecture_of(hf)
    if upcycle and arch not in DENSE_ARCHITECTURES:
        raise ConfigError("--upcycle", path, f"upcycles a dense checkpoint (Llama, Mistral); this one is {arch}")
    overrides = [f"train.init_from={path}"]
    for req in hub_requirements(path, hf, upcycle, SETTING):
        overrides += [o for o in req.overrides() if o not in overrides]
    tokenizer = tokenizer_override(path)
    if tokenizer is not None:
        overrides.append(f"data.tokenizer={tokenizer}")
    return arch, overrides


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-import", description="Print the moe-train command that starts from a "
                                "local transformers checkpoint (train.init_from).")
    p.add_argument("path", metavar=SETTING, help="a transformers model directory (config.json, *.safetensors)")
    p.add_argument("--upcycle", action="store_true", help="a dense checkpoint into model=moe: every expert a copy "
                   "of its block's FFN")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        arch, overrides = import_command(args.path, args.upcycle)
    except ConfigError as err:
        print(f"moe-import: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"moe-import: {args.path} is {arch}" + (", upcycled into experts" if args.upcycle else ""))
    print("moe-train " + " ".join(shlex.quote(o) for o in overrides))


if __name__ == "__main__":
    main()
