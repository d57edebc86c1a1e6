"""``moe.selection_noise``: hashed per token, the same wherever a row is computed, and what it is for."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from moe_trainer.config.schema import Config, MoEConfig
from moe_trainer.engine import build_model
from moe_trainer.moe.router import Router
from moe_trainer.moe.routing_noise import routing_keys, uniform_noise
from moe_trainer.parallel.schedule import run_microbatches

IDX = torch.randint(0, 257, (6, 32), generator=torch.Generator().manual_seed(0))


def test_a_rows_keys_do_not_depend_on_the_rows_beside_it() -> None:
    """What makes the noise the same in every layout: ranks and micro-batches hold slices of rows."""
    whole = routing_keys(IDX, 3)
    assert torch.equal(torch.cat([routing_keys(IDX[:2], 3), routing_keys(IDX[2:], 3)]), whole)
    assert torch.equal(routing_keys(IDX[[4, 1]], 3), whole[[4, 1]])


def test_keys_differ_by_position_row_and_salt() -> None:
    keys = routing_keys(IDX, 3)
    assert keys.unique().numel() == keys.numel()
    assert not torch.equal(routing_keys(IDX, 4), keys)


def test_a_key_never_depends_on_a_later_token() -> None:
    """The training forward stays causal: changing token s moves the keys from s on, none before."""
    changed = IDX.clone()
    changed[0, 10] += 1
    moved = routing_keys(changed, 3)
    keys = routing_keys(IDX, 3)
    assert torch.equal(moved[0, :10], keys[0, :10]) and (moved[0, 10:] != keys[0, 10:]).all()
    assert torch.equal(moved[1:], keys[1:])


def test_keys_and_noise_are_pinned() -> None:
    """The hash is part of every run's numbers: a change to it changes what a seed trains."""
    keys = routing_keys(torch.tensor([[0, 1, 256]]), 0)
    assert keys.tolist() == [[5476333178966447588, 5869180231687853013, -5191257958733388643]]
    noise = uniform_noise(keys[0], layer=1, num_experts=3)
    assert [round(v, 6) for v in noise.flatten().tolist()] == [
        0.224984, 0.148086, 0.353199, 0.345166, -0.373599, -0.237902, -0.045645, -0.473861, 0.20644]


@pytest.mark.parametrize("layer", [0, 8, 9, 63, 1000])
def test_any_layer_and_seed_hash_without_overflow(layer: int) -> None:
    """Salts are reduced modulo 2**64 before torch sees them (a Python int past int64 raises there)."""
    keys = routing_keys(IDX, 2**64 + 7)
    assert torch.equal(keys, routing_keys(IDX, 7))
    assert uniform_noise(keys.flatten(), layer, 8).abs().max() < 0.5


def test_noise_is_uniform_with_unit_width_and_independent_across_experts_and_layers() -> None:
    keys_T = routing_keys(torch.randint(0, 257, (64, 128), generator=torch.Generator().manual_seed(1)), 0).flatten()
    noise = uniform_noise(keys_T, layer=2, num_experts=16)
    assert noise.shape == (keys_T.numel(), 16) and noise.dtype == torch.float32
    assert -0.5 < noise.min() and noise.max() < 0.5
    assert noise.mean().abs() < 0.01 and noise.std() == pytest.approx(12**-0.5, rel=0.02)
    assert torch.histc(noise, 10, -0.5, 0.5).div(noise.numel() / 10).sub(1).abs().max() < 0.05
    corr = torch.corrcoef(torch.stack([noise[:, 0], noise[:, 1], uniform_noise(keys_T, 3, 16)[:, 0]]))
    assert corr.sub(torch.eye(3)).abs().max() < 0.05
    assert torch.equal(uniform_noise(keys_T, 2, 16), noise)  # a function of its inputs: recomputable


def _tied_router(noise: float) -> Router:
    """Top-2 of 4 experts with 0 always first and 1 and 2 exactly tied for second: a block of
    identical tokens, as indentation bytes are at the first layer."""
    cfg = MoEConfig(num_experts=4, top_k=2, selection_noise=noise)
    router = Router(4, cfg)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[3.0, 0, 0, 0], [1.0, 0, 0, 0], [1.0, 0, 0, 0], [-2.0, 0, 0, 0]]))
    return router


def test_noise_splits_a_tied_block_of_tokens_and_never_touches_the_weights() -> None:
    x = torch.ones(4000, 4)
    keys = torch.arange(4000, dtype=torch.int64) * 7919
    quiet = _tied_router(0.0)(x, noise_keys_T=keys)
    assert quiet.tokens_per_expert_E[1:3].tolist() in ([4000, 0], [0, 4000])  # the whole block one way
    noisy = _tied_router(0.01)(x, noise_keys_T=keys)
    assert noisy.tokens_per_expert_E[0] == 4000 and noisy.tokens_per_expert_E[3] == 0
    assert 1800 < noisy.tokens_per_expert_E[1] < 2200  # split about evenly between the tied two
    assert torch.equal(noisy.weight_A, quiet.weight_A)  # gate weights: the tied experts' equal probabilities


def test_training_with_noise_and_no_keys_is_refused() -> None:
    """A local stand-in key (the token's index) would differ between layouts: no silent fallback."""
    with pytest.raises(ValueError, match="routing key"):
        _tied_router(0.01)(torch.ones(8, 4))
    _tied_router(0.0)(torch.ones(8, 4))  # no noise, no keys needed


def test_noise_is_off_in_evaluation_and_follows_the_keys_in_training() -> None:
    x = torch.ones(4000, 4)
    keys = torch.arange(4000, dtype=torch.int64)
    router = _tied_router(0.01)
    trained = router(x, noise_keys_T=keys)
    assert torch.equal(router(x, noise_keys_T=keys).expert_idx_A, trained.expert_idx_A)
    assert not torch.equal(router(x, noise_keys_T=keys + 1).expert_idx_A, trained.expert_idx_A)
    assert not torch.equal(router(x, noise_keys_T=keys, layer=1).expert_idx_A, trained.expert_idx_A)
    router.eval()
    assert torch.equal(router(x).expert_idx_A, _tied_router(0.0)(x).expert_idx_A)


def test_the_model_draws_the_same_noise_for_a_row_in_whole_or_in_micro_batches(
        make_config: Callable[..., Config]) -> None:
    """Through the model's own paths: one forward over the batch, and micro-batches in lockstep
    (expert_parallel, disaggregated); the noise moves routing in training and is gone in evaluation."""
    idx = torch.randint(0, 257, (4, 16), generator=torch.Generator().manual_seed(0))

    def loads(model: torch.nn.Module, chunks: int) -> list[torch.Tensor]:
        with torch.no_grad():
            outs = run_microbatches(model, list(idx.chunk(chunks)))
        return [sum(o.moe_stats[i].tokens_per_expert_E for o in outs) for i in range(len(outs[0].moe_stats))]

    noisy = build_model(make_config("moe.selection_noise=0.05"), 257)
    quiet = build_model(make_config("moe.selection_noise=0"), 257)
    whole, split = loads(noisy, 1), loads(noisy, 2)
    assert all(torch.equal(a, b) for a, b in zip(whole, split, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(whole, loads(quiet, 1), strict=True))
    noisy.eval()
    assert all(torch.equal(a, b) for a, b in zip(loads(noisy, 2), loads(quiet, 1), strict=True))


def test_a_deep_model_trains_with_the_noise(make_config: Callable[..., Config]) -> None:
    """Ten MoE blocks: the layer salts past int64 (layer 9 on) hash as the first ones do."""
    model = build_model(make_config("moe.selection_noise=0.05", "model.n_layers=10"), 257)
    out = model(IDX[:2])
    out.logits_BSV.float().mean().backward()
    assert len(out.moe_stats) == 10 and model.moe_layers()[9].router.weight.grad is not None
