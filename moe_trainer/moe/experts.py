"""Experts: the local shard of SwiGLU experts, run as grouped matmuls over per-expert row runs.

Rows arrive grouped by expert (see :mod:`moe_trainer.moe.dispatcher`), so each
expert computes two matmuls over one contiguous slice: a grouped matmul, never a
loop over tokens. Weights are stacked ``[E_local, ...]`` tensors; ``first_expert``
records which global experts this shard holds, so checkpoints and initialisation
are keyed by global expert index and do not depend on how experts are placed.
The math, its backward and the choice of kernels live in :mod:`moe_trainer.moe.expert_kernels`.

Shape legend: N rows, D width, F expert hidden width, E local experts.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from moe_trainer.host_memory import retaining
from moe_trainer.moe.expert_kernels import ExpertCall, GradBuffer, GroupedSwiGLU, Runs, choose_kernels, compute_dtype


def is_expert_param(name: str) -> bool:
    """Whether parameter ``name`` (as ``named_parameters`` gives it) belongs to a shard of experts.

    Every model holds its experts in a submodule named ``experts`` (:class:`SwiGLUExperts`); their
    gradients are reduced over the expert-data-parallel group and their optimizer state sharded there.
    """
    return ".experts." in name


class SwiGLUExperts(nn.Module):
    """``E_local`` SwiGLU FFNs: ``w2(silu(x w_gate) * (x w_up))`` (Shazeer, https://arxiv.org/abs/2002.05202).

    ``recompute`` (default False): the forward keeps only its input rows and the backward
    recomputes the hidden activations (set from ``train.recompute``). ``kernel``:
    ``auto`` (grouped GEMM where it serves, see :func:`~moe_trainer.moe.expert_kernels.choose_kernels`),
    ``grouped`` (required: an error where it cannot run) or ``loop`` (one matmul per expert).
    """

    def __init__(self, num_local: int, d_model: int, hidden: int, first_expert: int = 0) -> None:
        super().__init__()
        self.first_expert = first_expert
        self.hidden = hidden
        # gate and up projections fused so each run costs one input matmul
        self.w_gate_up_EDF2 = nn.Parameter(torch.empty(num_local, d_model, 2 * hidden))
        self.w_down_EFD = nn.Parameter(torch.empty(num_local, hidden, d_model))
        # usable on its own; the transformer re-initialises per global expert index
        nn.init.normal_(self.w_gate_up_EDF2, std=0.02)
        nn.init.normal_(self.w_down_EFD, std=0.02)
        self.grad_sinks = (GradBuffer(), GradBuffer())  # reused weight-gradient storage
        self.recompute = False
        self.kernel = "auto"

    @property
    def num_local(self) -> int:
        return self.w_down_EFD.shape[0]

    def call_for(self, x_ND: Tensor) -> tuple[Tensor, ExpertCall]:
        """The rows in the compute dtype (autocast's when on) and the kernels for them (chosen once, cached)."""
        x_ND = x_ND.to(compute_dtype(x_ND))
        kernels = choose_kernels(self.kernel, self.w_down_EFD.shape[2], self.hidden, x_ND.dtype, x_ND.device,
                                 retaining(), self.recompute)
        return x_ND, ExpertCall(kernels, self.recompute)

    def forward(self, x_ND: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        """``x_ND`` holds ``tokens_per_expert_E[e]`` consecutive rows for local expert ``e``.

        ``tokens_per_expert_E`` stays on the device: the grouped kernel reads it there.
        Empty runs still count: every local expert gets a (zero) gradient, so gradient
        syncs see the same tensors on every rank.
        """
        if self.num_local == 0:  # a shard with no experts (a coordinator): keep the graph connected
            return x_ND * 0.0
        x_ND, call = self.call_for(x_ND)
        if not pads_runs(x_ND):
            return self._run(x_ND, Runs(tokens_per_expert_E), call)
        counts = tokens_per_expert_E.tolist()  # CPU only: padding needs the lengths on the host
        padded = bucketed(counts)
        dest_N = padded_rows(tokens_per_expert_E, counts, padded)
        x_pad = x_ND.new_zeros(sum(padded), x_ND.shape[1]).index_copy(0, dest_N, x_ND)
        padded_E = torch.tensor(padded, dtype=tokens_per_expert_E.dtype, device=tokens_per_expert_E.device)
        return self._run(x_pad, Runs(padded_E, padded), call).index_select(0, dest_N)

    def _run(self, x_ND: Tensor, runs: Runs, call: ExpertCall) -> Tensor:
        y_ND = GroupedSwiGLU.apply(x_ND, self.w_gate_up_EDF2, self.w_down_EFD, runs, call, self.grad_sinks)
        assert isinstance(y_ND, Tensor)
        return y_ND


def pads_runs(x_ND: Tensor) -> bool:
    """Whether expert runs are padded to bucketed lengths: bf16 on CPU, where oneDNN builds (JIT-compiles)
    a matmul primitive per shape and caches 1024 of them.

    Every step brings new per-expert row counts, so unpadded runs miss that cache: measured
    0.8 ms extra per expert matmul at 128 x 512 (1.04 vs 0.27 ms), which cost more than bf16
    saves. fp32 (MKL) and GPUs have no such cost and run the runs as they are.
    """
    return x_ND.dtype == torch.bfloat16 and x_ND.device.type == "cpu"


def bucketed(counts: list[int]) -> list[int]:
    """Run lengths rounded up to 8 sizes per octave, steps of at least 32 rows (waste under 1/8 or 32 rows)."""
    return [n if n == 0 else -(-n // (step := max(32, 1 << max(0, n.bit_length() - 4)))) * step for n in counts]


def padded_rows(counts_E: Tensor, counts: list[int], padded: list[int]) -> Tensor:
    """Where each row of the unpadded runs lands in the padded runs (zero rows fill the rest).

    Zero input rows give zero activations and, with zero output gradients, add nothing to the
    weight gradients: the padded runs compute exactly the unpadded function.
    """
    shift, start, padded_start = [], 0, 0
    for n, m in zip(counts, padded, strict=True):
        shift.append(padded_start - start)
        start, padded_start = start + n, padded_start + m
    shift_N = torch.repeat_interleave(torch.tensor(shift, device=counts_E.device), counts_E, output_size=start)
    return torch.arange(start, device=counts_E.device) + shift_N
