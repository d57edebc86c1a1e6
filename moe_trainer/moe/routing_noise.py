"""Selection noise for token-choice routing (``moe.selection_noise``), the same in every layout.

Why: a byte-level vocabulary puts many tokens in nearly the same state at the first MoE layer
(every indentation space, say), and such a block of tokens goes to the same k experts. When
its k-th choice is a near tie between two experts, the whole block flips between them as the
selection bias moves, and one of the two carries a few per cent of the batch on top of its
share at every step (docs/moe-study.md, seventh session). Gaussian noise on the scores used
for *selection* (never the gate weights) splits such a block in proportion to how near the
tie is, which the bias can then settle: noisy top-k gating (Shazeer et al., 2017,
https://arxiv.org/abs/1701.06538), without the learned noise scale.

The noise must not depend on how the global batch is cut into ranks and micro-batches, or the
layouts would stop matching ``single``. So it is not drawn from a generator but hashed from a
key per token: a hash of the token's whole row (its token ids) and its position in the row,
which every layout computes alike for the rows it holds, then mixed with the layer and the
expert. Integer arithmetic wraps modulo 2**64 on every device, so the noise is bit-identical
wherever it is computed; it costs a few elementwise passes over ``[T, E]``, with no host sync.

Shape legend: B rows, S positions, T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

# odd 64-bit multipliers (as signed int64) of a splitmix64-style finaliser
_M1 = 0x3F58476D1CE4E5B9
_M2 = -0x6B2FB644ECCEEE15
_GOLDEN = 0x1E3779B97F4A7C15
# murmur3's 32-bit finaliser multipliers, as signed int32
_M32_1 = -0x7A143595
_M32_2 = -0x3D4D51CB


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 values (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: Tensor) -> Tensor:
    """A bijective int64 mixer: every input bit moves about half the output bits."""
    z = (z ^ _shift_right(z, 30)) * _M1
    z = (z ^ _shift_right(z, 27)) * _M2
    return z ^ _shift_right(z, 31)


def routing_keys(idx_BS: Tensor, salt: int) -> Tensor:
    """int64 ``[B, S]``: one key per token, from its row's token ids, its position and ``salt``.

    A row's hash is a sum of its token ids times per-position random weights (wrapping), so two
    rows share keys only if they hold the same tokens; a rank or micro-batch that holds a row
    computes the same keys for it as any other layout.
    """
    positions_S = torch.arange(idx_BS.shape[1], device=idx_BS.device, dtype=torch.int64)
    weights_S = mix(positions_S * _GOLDEN + salt)
    row_B = mix((idx_BS.to(torch.int64) * weights_S).sum(dim=1))
    return mix(row_B[:, None] + mix(positions_S + ~salt)[None, :])


def uniform_noise(keys_T: Tensor, layer: int, num_experts: int) -> Tensor:
    """fp32 ``[T, E]`` values uniform in (-1/2, 1/2), a function of each token's key, the layer and the expert.

    Uniform rather than Gaussian, and hashed in int32 (murmur3's finaliser on the key folded to 32
    bits, salted per layer and expert): it runs over every token-expert pair of every MoE layer,
    and at 64 experts this costs about half a top-k instead of several. What the noise is for, to
    split near ties, needs a smooth spread, not a particular shape.
    """
    experts_E = torch.arange(num_experts, device=keys_T.device, dtype=torch.int64)
    salt_E = _fold(mix(experts_E + layer * _GOLDEN))
    z_TE = _fold(keys_T)[:, None] ^ salt_E[None, :]
    z_TE = z_TE * _M32_1
    z_TE = z_TE ^ ((z_TE >> 16) & 0xFFFF)
    z_TE = z_TE * _M32_2
    z_TE = z_TE ^ ((z_TE >> 13) & 0x7FFFF)
    return (((z_TE >> 8) & 0xFFFFFF).float() + 0.5) * 2.0**-24 - 0.5


def _fold(z: Tensor) -> Tensor:
    """int64 to int32, every input bit kept in play (high half xor low half)."""
    return (z ^ _shift_right(z, 32)).to(torch.int32)
