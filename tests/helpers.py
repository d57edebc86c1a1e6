"""Test helpers written once: reading a run's records, comparing tensors by relative error."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every record of a run's ``metrics.jsonl`` (training steps, evaluations, events)."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """``||got - want|| / ||want||`` in float64 (0 when both are zero)."""
    diff = torch.linalg.vector_norm((got.double() - want.double()).flatten()).item()
    scale = torch.linalg.vector_norm(want.double().flatten()).item()
    return diff / scale if scale > 0 else diff


def assert_rel_close(got: torch.Tensor, want: torch.Tensor, rel: float, what: str, atol: float = 1e-10) -> None:
    """``||got - want|| <= rel * ||want|| + atol``: relative, so tiny tensors (Adam's second moments) count.

    An elementwise absolute tolerance would pass any tensor whose entries are all below it.
    """
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = torch.linalg.vector_norm((got.double() - want.double()).flatten()).item()
    scale = torch.linalg.vector_norm(want.double().flatten()).item()
    assert diff <= rel * scale + atol, f"{what}: relative difference {diff / max(scale, 1e-300):.3e} > {rel:g}"
