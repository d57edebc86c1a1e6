"""``train.recompute`` changes what backward recomputes, never what it computes.

In-process on ``single``: every gradient and loss of ``attention`` and ``block`` equals
``none``'s, on mixes that route through every part a recompute region covers (shared
experts, a dense block, bias-balanced and expert-choice routing, capacity drops); and
each mode really drops what it claims from what the forward keeps for backward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from moe_trainer.config.schema import Config
from moe_trainer.engine import LocalEngine, build_model
from moe_trainer.model.memory import kept_activations
from moe_trainer.parallel.schedule import run_microbatches
from tests.helpers import assert_rel_close

REL = 1e-6
MIXES = {
    # a dense block between MoE blocks, shared experts, a bias that moves, drops past capacity, and
    # selection noise (recomputed in backward, its decisions kept)
    "token_choice": ["moe.every=2", "moe.num_shared_experts=1", "moe.shared_expert_hidden=16",
                     "moe.bias_balancing=true", "moe.bias_update_rate=0.05", "moe.capacity_factor=1.0",
                     "moe.selection_noise=0.05"],
    "expert_choice": ["moe.router=expert_choice"],  # decisions by a sort over tied scores
}


def two_steps(cfg: Config) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
    engine = LocalEngine(cfg)
    records = engine.train(1)
    grads = engine.gradients()[0]
    return records + engine.train(1), grads


@pytest.mark.parametrize("mix", list(MIXES))
def test_recompute_modes_compute_what_none_computes(make_config: Callable[..., Config], mix: str) -> None:
    base = ["train.grad_clip=0", *MIXES[mix]]
    ref_records, ref_grads = two_steps(make_config(*base, "train.recompute=none"))
    for mode in ("attention", "block"):
        records, grads = two_steps(make_config(*base, f"train.recompute={mode}"))
        assert grads.keys() == ref_grads.keys()
        for key, ref in ref_grads.items():
            assert_rel_close(grads[key], ref, REL, f"{mode}: {key}")
        for rec, ref_rec in zip(records, ref_records, strict=True):
            for key in ("loss", "aux_loss", "z_loss", "grad_norm", "dropped_frac"):
                assert rec[key] == pytest.approx(ref_rec[key], rel=REL), f"{mode}: {key}"
            assert rec.get("expert_bias") == ref_rec.get("expert_bias")  # the same routing decisions
            assert [layer["tokens_per_expert"] for layer in rec["layers"]] == [
                layer["tokens_per_expert"] for layer in ref_rec["layers"]]


def kept_by_part(cfg: Config) -> dict[str, int]:
    """Bytes the forward keeps for backward, by part of the model (summed over blocks)."""
    torch.manual_seed(0)
    model = build_model(cfg, 257)
    idx = torch.randint(0, 257, (cfg.train.batch_size, cfg.data.seq_len))

    def forward() -> torch.Tensor:
        return F.cross_entropy(model(idx).logits_BSV.flatten(0, 1), idx.flatten())

    loss, kept = kept_activations(model, forward)
    loss.backward()  # the graph was complete: recompute regions rebuild what they dropped
    parts: dict[str, int] = {}
    for name, nbytes in kept.by_module.items():
        part = name.split(".")[2] if name.startswith("blocks.") and name.count(".") >= 2 else name
        if part == "ffn" and ".ffn." in name:
            part = name.split(".")[3]  # router, experts, shared, gate_up, down
        parts[part] = parts.get(part, 0) + nbytes
    return parts


def test_each_mode_drops_what_it_claims(make_config: Callable[..., Config]) -> None:
    overrides = ["moe.every=2", "moe.num_shared_experts=1", "moe.shared_expert_hidden=16"]
    none, attention, block = (kept_by_part(make_config(*overrides, f"train.recompute={m}"))
                              for m in ("none", "attention", "block"))
    tokens = 4 * 32  # debug batch x seq_len
    assert none["attn"] > 0 and none["attn_norm"] > 0 and none["ffn_norm"] > 0 and none["router"] > 0
    assert none["gate_up"] > 0 and none["shared"] > 0  # dense FFN and shared expert keep their hidden activations
    # attention: nothing of the attention sub-block is kept, the rest is as before
    assert "attn" not in attention and "attn_norm" not in attention
    assert attention["ffn_norm"] == none["ffn_norm"] and attention["gate_up"] == none["gate_up"]
    # block: no attention, norm, dense FFN or shared-expert activations; of the router only its decisions
    # (top-2 values and indices of the MoE layer's tokens); of the FFN norm only its output, the input
    # the shared expert's region keeps
    for part in ("attn", "attn_norm", "gate_up", "down", "shared"):
        assert part not in block, part
    assert block["router"] == tokens * 2 * (4 + 8)
    assert block["ffn_norm"] == tokens * 32 * 4
    assert sum(block.values()) < 0.7 * sum(attention.values()) < 0.9 * sum(none.values())


@pytest.mark.parametrize("mode", ["attention", "block"])
def test_bf16_micro_batches_recompute_what_their_forward_ran(make_config: Callable[..., Config], mode: str) -> None:
    """Two micro-batches in one bf16 forward (as expert_parallel and disaggregated run them).

    With autocast's weight cache the second micro-batch skips the weight casts the first one made,
    and its recompute (which runs without the cache) fails on the mismatch.
    """
    from moe_trainer.train.precision import autocast

    grads = {}
    for recompute in ("none", mode):
        cfg = make_config(f"train.recompute={recompute}", "train.precision=bf16")
        model = build_model(cfg, 257)
        idx = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))
        with autocast("bf16", idx.device):
            outs = run_microbatches(model, list(idx.chunk(2)))
        loss = sum(F.cross_entropy(o.logits_BSV.flatten(0, 1).float(), t.flatten())
                   for o, t in zip(outs, idx.roll(-1, 1).chunk(2), strict=True))
        loss.backward()
        grads[recompute] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    for name, ref in grads["none"].items():
        assert_rel_close(grads[mode][name], ref, REL, name)
