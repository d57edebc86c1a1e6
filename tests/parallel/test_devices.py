"""Every tensor the MoE layer, the dispatchers and the loss create follows the device of their inputs.

The check runs on the CPU: the default device is set to ``meta`` while CPU inputs flow
through, so a tensor made without ``device=`` (``torch.arange(n)``, ``torch.tensor(...)``)
lands on ``meta`` instead of beside its inputs, and is caught there; on a GPU that tensor
would have been a CPU tensor indexing CUDA ones, or handed to NCCL. The distributed
dispatchers run over a one-rank gloo group in this process, all-to-alls included.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_trainer.config.schema import Config, MoEConfig
from moe_trainer.model.transformer import Transformer
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.moe.layer import MoELayer
from moe_trainer.parallel.async_a2a import AsyncAllToAllTransport
from moe_trainer.parallel.context import DistributedContext, Groups
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.overlap import ChunkedAllToAllTransport
from moe_trainer.parallel.protocol import FORWARD, header, regroup_index
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.train.trainer import SingleContext, Trainer


class StrayTensors(TorchDispatchMode):
    """Records every op whose output landed on ``meta`` (the default device), with the package line."""

    def __init__(self) -> None:
        super().__init__()
        self.stray: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if any(isinstance(o, torch.Tensor) and o.is_meta for o in (out if isinstance(out, (tuple, list)) else [out])):
            frames = [f for f in traceback.extract_stack() if "/moe_trainer/" in f.filename]
            where = f"{frames[-1].filename.split('/moe_trainer/')[-1]}:{frames[-1].lineno}" if frames else "?"
            self.stray.append(f"{func} at {where}")
        return out


def assert_follows_inputs(fn: Callable[[], Any]) -> None:
    stray = StrayTensors()
    try:
        with torch.device("meta"), stray:
            fn()
    except (RuntimeError, NotImplementedError) as err:  # a stray tensor met a CPU one
        raise AssertionError(f"{err}; tensors made off their inputs' device: {stray.stray}") from err
    assert not stray.stray, stray.stray


@pytest.fixture
def group(one_rank_gloo: Any) -> Any:
    return one_rank_gloo


@pytest.mark.parametrize("path", ["local", "expert_parallel", "a2a_chunks=2", "micro_batches=2"])
@pytest.mark.parametrize("cf", [None, 1.0], ids=["dropless", "capacity"])
def test_moe_layer_forward_backward(group: Any, path: str, cf: float | None) -> None:
    dispatcher = {"local": lambda: None,
                  "expert_parallel": lambda: Dispatcher(4, cf, AllToAllTransport(group, 1, 0, 4)),
                  "a2a_chunks=2": lambda: Dispatcher(4, cf, ChunkedAllToAllTransport(group, 1, 0, 4, 2)),
                  "micro_batches=2": lambda: Dispatcher(4, cf, AsyncAllToAllTransport(group, 1, 0, 4))}[path]()
    micro = 2 if path == "micro_batches=2" else 1
    torch.manual_seed(0)
    layer = MoELayer(16, MoEConfig(num_experts=4, top_k=2, expert_hidden=16, capacity_factor=cf), dispatcher)
    x = torch.randn(1, 64, 16, requires_grad=True)

    def run() -> None:
        pending = [layer.compute(layer.start(part, 1)) for part in x.chunk(micro, dim=1)]
        y = torch.cat([layer.complete(p)[0] for p in pending], dim=1)
        y.backward(torch.ones_like(y))

    assert_follows_inputs(run)


def test_disaggregated_message_header(group: Any) -> None:
    """A header travels point to point: on NCCL it must be a CUDA tensor, i.e. on the counts' device."""
    counts = torch.tensor([[2, 0], [1, 1]])
    assert_follows_inputs(lambda: header(FORWARD, 3, 1, counts))


@pytest.mark.parametrize("strategy", ["single", "expert_parallel"])
def test_trainer_loss_and_gradients(group: Any, make_config: Callable[..., Config], strategy: str) -> None:
    """The loss with the global aux loss (router loads summed over ranks), its backward and the gradient norm."""
    cfg = make_config("moe.bias_balancing=true")
    vocab = 257
    if strategy == "single":
        model, ctx = Transformer(cfg.model, cfg.moe, vocab, 0), SingleContext()
    else:
        counters = CommCounters()
        e = cfg.moe.num_experts
        dispatcher = Dispatcher(e, None, AllToAllTransport(group, 1, 0, e, counters))
        model = Transformer(cfg.model, cfg.moe, vocab, 0, dispatcher=dispatcher, expert_range=(0, e))
        ctx = DistributedContext(0, 1, Groups(None, None, 1, None, True), counters, torch.device("cpu"))
    trainer = Trainer(cfg, model, None, ctx)  # type: ignore[arg-type]  # no batches drawn: loss() gets them
    tokens = torch.randint(0, vocab, (cfg.train.batch_size, cfg.data.seq_len + 1))

    def run() -> None:
        parts = trainer.loss(tokens[:, :-1], tokens[:, 1:])
        parts.total.backward()
        ctx.sync_gradients(model)
        ctx.grad_norm(model)

    assert_follows_inputs(run)


def test_regroup_index_of_several_peers() -> None:
    """With one peer the rows need no regrouping (the one-rank dispatchers above skip it): check it directly."""
    counts = torch.tensor([[2, 0], [1, 1]])
    assert_follows_inputs(lambda: regroup_index(counts, 4))
