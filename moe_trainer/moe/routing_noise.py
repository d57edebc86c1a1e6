"""Selection noise for token-choice routing (``moe.selection_noise``), the same in every layout.

Why: a byte-level vocabulary puts many tokens in nearly the same state at the first MoE layer
(every indentation space, say), and such a block of tokens goes to the same k experts. When
its k-th choice is a near tie between two experts, the whole block flips between them as the
selection bias moves, and one of the two carries a few per cent of the batch on top of its
share at every step (docs/moe-study.md, seventh session). Noise on the scores used for
*selection* (never the gate weights) splits such a block in proportion to how near the tie
is, which the bias can then settle: noisy top-k gating (Shazeer et al., 2017,
https://arxiv.org/abs/1701.06538), with a fixed scale instead of a learned one.

The noise must not depend on how the global batch is cut into ranks and micro-batches, or the
layouts would stop matching ``single``. So it is not drawn from a generator but hashed from a
key per token: a hash of its row's token ids up to its own and of its position, which every
layout computes alike for the rows it holds, then mixed with the layer and the expert. A
window drawn twice gets the same noise both times (windows start at random, so that is rare).
Integer arithmetic wraps modulo 2**64 on every device, so the noise is bit-identical wherever
it is computed; it costs a few elementwise passes over ``[T, E]``, with no host sync.

Shape legend: B rows, S positions, T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

# odd multipliers of a splitmix64-style finaliser (its constants with the top bit cleared, so that they
# are int64 literals; any odd multiplier keeps the mix a bijection) and a Weyl step between positions
_M1 = 0x3F58476D1CE4E5B9
_M2 = -0x6B2FB644ECCEEE15
_GOLDEN = 0x1E3779B97F4A7C15
# murmur3's 32-bit finaliser multipliers, as signed int32
_M32_1 = -0x7A143595
_M32_2 = -0x3D4D51CB


def _int64(value: int) -> int:
    """``value`` modulo 2**64 as a signed int64 (torch refuses Python ints outside that range)."""
    return (value + 2**63) % 2**64 - 2**63


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: Tensor) -> Tensor:
    """A bijective int64 mixer: every input bit moves about half the output bits."""
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    return z ^ _shift_right(z, 31)


def routing_keys(idx_BS: Tensor, salt: int) -> Tensor:
    """int64 ``[B, S]``: one key per token, from its row's token ids up to its own, its position and ``salt``.

    The hash of a row's prefix is a running sum of its token ids times per-position random weights
    (wrapping modulo 2**64, so exact in any order of summation): two tokens share a key only if
    their rows agree up to them. A rank or micro-batch that holds a row computes the same keys for
    it as any other layout. No key depends on a later token, so the training forward stays causal:
    a token's routing never carries what comes after it, its own target included.
    """
    salt = _int64(salt)
    positions_S = torch.arange(idx_BS.shape[1], device=idx_BS.device, dtype=torch.int64)
    weights_S = mix(positions_S * _GOLDEN + salt)
    prefix_BS = torch.cumsum(idx_BS.to(torch.int64) * weights_S, dim=1)
    return mix(prefix_BS + mix(positions_S + ~salt)[None, :])


def uniform_noise(keys_T: Tensor, layer: int, num_experts: int) -> Tensor:
    """fp32 ``[T, E]`` values uniform in (-1/2, 1/2), a function of each token's key, the layer and the expert.

    Uniform rather than Gaussian, and hashed in int32 (murmur3's finaliser on the key folded to 32
    bits, salted per layer and expert): it runs over every token-expert pair of every MoE layer,
    and at 64 experts this costs about half a top-k instead of several. What the noise is for, to
    split near ties, needs a smooth spread, not a particular shape.
    """
    experts_E = torch.arange(num_experts, device=keys_T.device, dtype=torch.int64)
    salt_E = _fold(mix(experts_E + _int64(layer * _GOLDEN)))
    z_TE = _fold(keys_T)[:, None] ^ salt_E[None, :]
    z_TE = z_TE * _M32_1
    z_TE = z_TE ^ ((z_TE >> 16) & 0xFFFF)
    z_TE = z_TE * _M32_2
    z_TE = z_TE ^ ((z_TE >> 13) & 0x7FFFF)
    return (((z_TE >> 8) & 0xFFFFFF).float() + 0.5) * 2.0**-24 - 0.5


def _fold(z: Tensor) -> Tensor:
    """int64 to int32, every input bit kept in play (high half xor low half)."""
    return (z ^ _shift_right(z, 32)).to(torch.int32)
