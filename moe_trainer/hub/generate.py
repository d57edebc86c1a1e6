"""``moe-generate RUN_OR_CHECKPOINT --prompt TEXT``: sample from a trained model, streamed to the terminal.

The model of any layout's checkpoint is read whole into this process
(:mod:`moe_trainer.hub.trained_model`) on ``--device`` (``auto``: the GPU when there is one).
Each step runs the model on the last ``model.max_seq_len`` tokens (no key/value cache: the
models this trainer makes are small, and the model code stays the training code) and samples
the next token: temperature, then top-k, then top-p (nucleus, Holtzman et al.,
https://arxiv.org/abs/1904.09751); ``--temperature 0`` is greedy. Generation stops at
``--max-new-tokens`` or at the end-of-document token. Text is printed as soon as it decodes
to whole characters.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

import torch
from torch import Tensor

from moe_trainer.config.errors import ConfigError
from moe_trainer.data.tokenizer import Tokenizer
from moe_trainer.model.transformer import Transformer


def filter_logits(logits_V: Tensor, top_k: int, top_p: float) -> Tensor:
    """Logits with every token outside the top ``top_k`` (0: no limit) and outside the smallest set whose
    probability reaches ``top_p`` (1: no limit) set to -inf; the most likely token always stays."""
    out = logits_V.clone()
    if 0 < top_k < out.numel():
        kth = out.topk(top_k).values[-1]
        out[out < kth] = float("-inf")
    if top_p < 1.0:
        sorted_logits, order = out.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before a token already reaches top_p
        out[order[drop]] = float("-inf")
    return out


def next_token(logits_V: Tensor, temperature: float, top_k: int, top_p: float, generator: torch.Generator) -> int:
    """One token id sampled from fp32 ``logits_V`` (greedy when ``temperature`` is 0)."""
    if temperature == 0:
        return int(logits_V.argmax())
    probs = filter_logits(logits_V.float() / temperature, top_k, top_p).softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.inference_mode()
def generate(model: Transformer, tokenizer: Tokenizer, prompt: str, max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, seed: int) -> Iterator[int]:
    """Yields the sampled ids one at a time (the end-of-document id ends it and is not yielded)."""
    device = next(model.parameters()).device
    ids = [int(i) for i in tokenizer.encode(prompt)] or [tokenizer.eod_id]  # an empty prompt: a document start
    generator = torch.Generator().manual_seed(seed)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-window:]], dtype=torch.long, device=device)
        logits_V = model(context).logits_BSV[0, -1].float()
        token = next_token(logits_V, temperature, top_k, top_p, generator)
        if token == tokenizer.eod_id:
            return
        ids.append(token)
        yield token


def stream_text(ids: Iterator[int], tokenizer: Tokenizer) -> Iterator[str]:
    """The text of ``ids`` in pieces, each ending on a whole character (a cut UTF-8 sequence waits)."""
    seen: list[int] = []
    printed = ""
    for token in ids:
        seen.append(token)
        text = tokenizer.decode(seen)
        if text.endswith("\ufffd"):
            continue  # part of a multi-byte character: wait for the rest
        yield text[len(printed):]
        printed = text
    text = tokenizer.decode(seen)
    if len(text) > len(printed):
        yield text[len(printed):]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-generate", description="Sample text from a trained model.")
    p.add_argument("source", metavar="RUN_OR_CHECKPOINT", help="a run directory (its newest intact checkpoint) "
                   "or a checkpoints/step_* directory")
    p.add_argument("--prompt", default="", help="text to continue (default: a document start)")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no limit")
    p.add_argument("--top-p", type=float, default=0.95, help="1 = no limit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    try:
        for name, value, ok, allowed in (("--max-new-tokens", args.max_new_tokens, args.max_new_tokens > 0, "> 0"),
                                         ("--temperature", args.temperature, args.temperature >= 0, ">= 0"),
                                         ("--top-k", args.top_k, args.top_k >= 0, ">= 0"),
                                         ("--top-p", args.top_p, 0 < args.top_p <= 1, "in (0, 1]")):
            if not ok:
                raise ConfigError(name, value, f"must be {allowed}")
        from moe_trainer.device import single_device
        from moe_trainer.hub.trained_model import load_trained

        trained = load_trained(args.source, "RUN_OR_CHECKPOINT")
        model = trained.build(single_device(args.device))
    except ConfigError as err:
        print(f"moe-generate: {err}", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    ids = generate(model, trained.tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k,
                   args.top_p, args.seed)
    for piece in stream_text(ids, trained.tokenizer):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
