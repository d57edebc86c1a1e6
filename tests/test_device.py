"""Device choice for ``single``, the GPU math settings and batch copies (the GPU branches with a stand-in)."""

from __future__ import annotations

import pytest
import torch

from moe_trainer.device import configure_process, single_device, to_device


def test_auto_is_the_gpu_when_one_is_visible(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert single_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert single_device("auto") == torch.device("cuda", 0)
    assert single_device("cpu") == torch.device("cpu")


def test_tf32_is_allowed_on_gpu_only() -> None:
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    try:
        configure_process(torch.device("cpu"))
        assert (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision) == before
        configure_process(torch.device("cuda", 0))
        assert matmul.fp32_precision == "tf32" and torch.backends.cudnn.conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision = before


def test_batches_to_a_gpu_go_pinned_and_non_blocking(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    class Batch:  # a host tensor stand-in: this machine cannot pin memory without CUDA
        device = torch.device("cpu")

        def pin_memory(self) -> Batch:
            calls.append("pin")
            return self

        def to(self, device: torch.device, non_blocking: bool = False) -> str:
            calls.append(f"to {device} non_blocking={non_blocking}")
            return "copied"

    assert to_device(Batch(), torch.device("cuda", 0)) == "copied"  # type: ignore[arg-type]
    assert calls == ["pin", "to cuda:0 non_blocking=True"]
    t = torch.arange(3)
    assert to_device(t, torch.device("cpu")) is t  # CPU: no copy, no pinning
