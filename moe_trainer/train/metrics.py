"""Turns raw per-layer router counts into the load-balance metrics every strategy logs.

Counts are summed over the global batch (all micro-batches and ranks) *before*
these ratios are formed, so a distributed run reports the same numbers as the
single-process reference. They stay on the device of the router's statistics until
the step's metrics are formed (one host copy, in :func:`balance_metrics`), so the
forward pass never waits for them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from moe_trainer.moe.layer import MoEStats


@dataclass
class LoadCounts:
    """Additive load statistics of the MoE layers: safe to sum across ranks."""

    tokens_per_expert_LE: Tensor  # float64 [L, E] assignments per expert before drops
    dropped_L: Tensor  # float64 [L] assignments dropped past capacity
    assignments_L: Tensor  # float64 [L] assignments made
    entropy_sum_L: Tensor  # float64 [L] router entropy summed over routed batches (for means)
    batches: int  # forward passes summed into this record (host-side: never all-reduced)

    @classmethod
    def from_stats(cls, stats: list[MoEStats], num_experts: int) -> LoadCounts:
        if not stats:
            empty = torch.zeros(0, dtype=torch.float64)
            return cls(torch.zeros(0, num_experts, dtype=torch.float64), empty, empty, empty, 1)
        device = stats[0].tokens_per_expert_E.device
        return cls(
            tokens_per_expert_LE=torch.stack([s.tokens_per_expert_E for s in stats]).double(),
            dropped_L=torch.stack([s.dropped.to(device) for s in stats]).double(),
            assignments_L=torch.tensor([float(s.assignments) for s in stats], dtype=torch.float64, device=device),
            entropy_sum_L=torch.stack([s.router_entropy.to(device) for s in stats]).double(),
            batches=1,
        )

    @property
    def num_layers(self) -> int:
        return self.tokens_per_expert_LE.shape[0]

    @classmethod
    def total(cls, parts: list[LoadCounts]) -> LoadCounts:
        """Sum of several records (micro-batches of one step)."""
        first = parts[0]
        return cls.from_tensor(torch.stack([p.as_tensor() for p in parts]).sum(0), first.num_layers,
                               first.tokens_per_expert_LE.shape[1], sum(p.batches for p in parts))

    def as_tensor(self) -> Tensor:
        """Flattens the tensor fields into one float64 vector, so one all-reduce sums them all."""
        return torch.cat([self.tokens_per_expert_LE.flatten(), self.dropped_L, self.assignments_L,
                          self.entropy_sum_L])

    @classmethod
    def from_tensor(cls, flat: Tensor, num_layers: int, num_experts: int, batches: int) -> LoadCounts:
        le, n = num_layers * num_experts, num_layers
        return cls(flat[:le].view(n, num_experts), flat[le:le + n], flat[le + n:le + 2 * n],
                   flat[le + 2 * n:le + 3 * n], batches)


def balance_metrics(counts: LoadCounts) -> dict[str, object]:
    """Per-layer and mean load imbalance (max/mean), coefficient of variation, drops, entropy, and the
    least-used expert's share of its fair share (``min_share``: 1 balanced, 0 an expert that gets nothing).

    max/mean is 1 for perfect balance and E when every token goes to one expert.
    """
    counts = LoadCounts.from_tensor(counts.as_tensor().cpu(), counts.num_layers, counts.tokens_per_expert_LE.shape[1],
                                    counts.batches)  # one device-to-host copy for every number below
    layers = []
    for i in range(counts.tokens_per_expert_LE.shape[0]):
        load = counts.tokens_per_expert_LE[i]
        mean = load.mean().clamp_min(1e-12)
        layers.append({
            "tokens_per_expert": [int(v) for v in load.tolist()],
            "max_mean": float(load.max() / mean),
            "cv": float(load.std(unbiased=False) / mean),
            "min_share": float(load.min() / mean),  # the least-used expert's tokens over its fair share
            "dropped_frac": float(counts.dropped_L[i] / counts.assignments_L[i].clamp_min(1)),
            "router_entropy": float(counts.entropy_sum_L[i] / counts.batches),
        })
    if not layers:
        return {"layers": [], "load_imbalance": 1.0, "load_cv": 0.0, "load_min_share": 1.0, "dropped_frac": 0.0,
                "router_entropy": 0.0}

    def mean_of(key: str) -> float:
        return sum(layer[key] for layer in layers) / len(layers)  # type: ignore[misc]

    return {
        "layers": layers,
        "load_imbalance": mean_of("max_mean"),
        "load_cv": mean_of("cv"),
        "load_min_share": min(float(layer["min_share"]) for layer in layers),  # the least-used expert of any layer
        "dropped_frac": mean_of("dropped_frac"),
        "router_entropy": mean_of("router_entropy"),
    }
