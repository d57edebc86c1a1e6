"""``train.precision``: bf16 compute with fp32 master state trains like fp32; fp32 touches no autocast."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from moe_trainer.config.schema import Config
from moe_trainer.engine import LocalEngine
from moe_trainer.moe.dispatcher import Dispatcher


def spy_dispatches(monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.dtype, bool]]:
    """Records ``(payload dtype, autocast on)`` of every dispatch any Dispatcher makes."""
    seen: list[tuple[torch.dtype, bool]] = []
    dispatch = Dispatcher.dispatch

    def spy(self: Dispatcher, x_TD: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append((x_TD.dtype, torch.is_autocast_enabled("cpu")))
        return dispatch(self, x_TD, *args, **kwargs)

    monkeypatch.setattr(Dispatcher, "dispatch", spy)
    return seen


def test_bf16_trains_like_fp32_with_fp32_weights_and_optimizer_state(
        make_config: Callable[..., Config], monkeypatch: pytest.MonkeyPatch) -> None:
    steps = ["train.max_steps=12", "train.lr=1e-2"]
    ref = LocalEngine(make_config(*steps)).train(12)
    seen = spy_dispatches(monkeypatch)
    bf16 = LocalEngine(make_config(*steps, "train.precision=bf16"))
    start = bf16.evaluate()
    got = bf16.train(12)
    assert bf16.evaluate() < 0.85 * start
    assert seen and set(seen) == {(torch.bfloat16, True)}  # training and evaluation run under bf16
    losses, ref_losses = [r["loss"] for r in got], [r["loss"] for r in ref]
    assert losses != ref_losses  # really computed in bf16 ...
    assert losses == pytest.approx(ref_losses, rel=1e-2)  # ... and still the same training
    trainer = bf16.trainer
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    assert {p.grad.dtype for p in trainer.model.parameters() if p.grad is not None} == {torch.float32}
    moments = [t for state in trainer.optimizer.state.values() for t in state.values() if t.is_floating_point()]
    assert moments and {t.dtype for t in moments} == {torch.float32}


def test_fp32_runs_no_autocast_and_dispatches_fp32(make_config: Callable[..., Config],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """fp32 is the computation it always was: no autocast region, no cast of the rows."""
    seen = spy_dispatches(monkeypatch)
    engine = LocalEngine(make_config("train.max_steps=2"))
    engine.train(2)
    engine.evaluate()
    assert seen and set(seen) == {(torch.float32, False)}
