"""Dense building blocks: RMSNorm, rotary embeddings, causal attention, SwiGLU FFN.

Shape legend: B batch, S sequence, D width, H heads, Dh head width, F hidden width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich, https://arxiv.org/abs/1910.07467), computed in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rotary_tables(head_dim: int, max_len: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables ``[max_len, head_dim / 2]`` for rotary positions (Su et al., https://arxiv.org/abs/2104.09864)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x_BHSDh: Tensor, cos_SDh2: Tensor, sin_SDh2: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Rotates pairs (first half, second half) of each head by the position's angle, in fp32.

    Returns ``dtype`` (default: the input's).
    """
    x1, x2 = x_BHSDh.float().chunk(2, dim=-1)
    out = torch.cat((x1 * cos_SDh2 - x2 * sin_SDh2, x1 * sin_SDh2 + x2 * cos_SDh2), dim=-1)
    return out.to(dtype or x_BHSDh.dtype)


def attention_core_dtype(x: Tensor) -> torch.dtype:
    """The dtype of the attention core (``scaled_dot_product_attention``) for inputs ``x``.

    fp32 for bf16 on CPU: there torch's bf16 flash-attention backward costs twice the fp32
    one (6.1 vs 13.9 ms forward+backward at ``[8, 4, 128, 32]``, one thread; the core's
    matmuls are too small for bf16 to pay); elsewhere (GPUs' tensor cores) the input's dtype.
    """
    return torch.float32 if x.device.type == "cpu" and x.dtype == torch.bfloat16 else x.dtype


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions."""

    def __init__(self, d_model: int, n_heads: int, max_seq_len: int, rope_theta: float) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        cos, sin = rotary_tables(d_model // n_heads, max_seq_len, rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, x_BSD: Tensor) -> Tensor:
        b, s, d = x_BSD.shape
        q, k, v = self.qkv(x_BSD).view(b, s, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        cos, sin = self.cos[:s], self.sin[:s]
        core = attention_core_dtype(q)
        # autocast would cast an fp32 core back to bf16; nothing to switch off when the dtypes agree
        off = torch.autocast(x_BSD.device.type, enabled=False) if core != q.dtype else contextlib.nullcontext()
        with off:
            y_BHSDh = F.scaled_dot_product_attention(apply_rotary(q, cos, sin, core), apply_rotary(k, cos, sin, core),
                                                     v.to(core), is_causal=True)
        return self.out(y_BHSDh.transpose(1, 2).reshape(b, s, d))


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN ``w_down(silu(x w_gate) * (x w_up))``; also the shared expert."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(d_model, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)
