"""Counts the points where code makes the host wait for the device, on any device, CPU included.

On a GPU each of these stalls the host until the queued kernels finish, so the next
kernels are launched late and overlap is lost. On the CPU nothing waits, which is why
they go unnoticed: this counter finds them there, so a test can hold the count down.

Counted (each with the innermost ``moe_trainer`` source line that caused it):

- reads of a tensor's value on the host: ``.item()``, ``int()``/``float()``/``bool()``
  of a tensor (``aten._local_scalar_dense``), ``.tolist()``, ``.cpu()``, ``.numpy()``;
- ops whose output *shape* depends on tensor values, which a GPU can only size after a
  read: ``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``bincount``,
  ``repeat_interleave`` without ``output_size``;
- explicit waits: ``torch.cuda.synchronize``.

Usage::

    with HostSyncCounter() as syncs:
        y = layer(x)
    syncs.events  # [HostSync(kind="tolist", where="moe_trainer/moe/experts.py:49"), ...]
"""

from __future__ import annotations

import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_PACKAGE = str(Path(__file__).resolve().parent)
_SELF = str(Path(__file__).resolve())

# ops whose output shape is a function of input values
_DATA_DEPENDENT = {
    aten.nonzero.default: "nonzero",
    aten.masked_select.default: "masked_select",
    aten.bincount.default: "bincount",
    aten._unique2.default: "unique",
    aten.unique_dim.default: "unique",
    aten.unique_consecutive.default: "unique",
}


@dataclass(frozen=True)
class HostSync:
    kind: str  # what waited: item, tolist, cpu, numpy, nonzero, boolean_mask, bincount, repeat_interleave, ...
    where: str  # "moe_trainer/<module>.py:<line>" of the innermost package frame ("?" outside the package)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()):
        if frame.filename.startswith(_PACKAGE) and frame.filename != _SELF:
            return f"moe_trainer/{Path(frame.filename).relative_to(_PACKAGE)}:{frame.lineno}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """A dispatch mode (for ops) plus patched ``Tensor`` methods (for reads that never reach dispatch)."""

    _PATCHED = ("tolist", "cpu", "numpy")

    def __init__(self) -> None:
        super().__init__()
        self.events: list[HostSync] = []
        self._saved: dict[str, Any] = {}

    def _record(self, kind: str) -> None:
        self.events.append(HostSync(kind, _caller()))

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default:
            self._record("item")
        elif func in _DATA_DEPENDENT:
            self._record(_DATA_DEPENDENT[func])
        elif func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            self._record("repeat_interleave")
        elif func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            self._record("boolean_mask")
        return func(*args, **kwargs)

    def __enter__(self) -> HostSyncCounter:
        for name in self._PATCHED:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        self._saved["synchronize"] = torch.cuda.synchronize
        torch.cuda.synchronize = self._wrap("synchronize", torch.cuda.synchronize)  # type: ignore[assignment]
        super().__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for name in self._PATCHED:
            setattr(torch.Tensor, name, self._saved[name])
        torch.cuda.synchronize = self._saved["synchronize"]  # type: ignore[assignment]

    def _wrap(self, kind: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self._record(kind)
            return original(*args, **kwargs)
        return counted

    def by_place(self) -> dict[str, int]:
        """``{"kind at where": count}``, for reports and test messages."""
        return dict(Counter(f"{e.kind} at {e.where}" for e in self.events))

    def count(self, exclude: tuple[str, ...] = ()) -> int:
        """Events, leaving out those whose place starts with one of ``exclude`` (e.g. a module's path)."""
        return sum(not e.where.startswith(exclude) for e in self.events)


def moe_layer_syncs(cfg: Any, dispatcher: Any = None, tokens: int = 64, d_model: int = 16,
                    micro_batches: int = 1) -> tuple[HostSyncCounter, HostSyncCounter]:
    """Host syncs of one MoE layer's forward and of its backward, every expert in this process.

    ``dispatcher`` (default: the local one) may be a distributed dispatcher over a one-rank
    group (:func:`moe_trainer.parallel.comm.one_rank_group`), all-to-alls included.
    ``micro_batches > 1`` runs the layer as the lockstep caller does (every micro-batch
    started, then computed, then completed), as an asynchronous dispatcher needs.
    """
    from moe_trainer.moe.layer import MoELayer
    from moe_trainer.moe.routing_noise import routing_keys

    torch.manual_seed(0)
    layer = MoELayer(d_model, cfg, dispatcher=dispatcher)
    x = torch.randn(1, tokens, d_model, requires_grad=True)
    keys = routing_keys(torch.randint(0, 256, (1, tokens)), 0)  # moe.selection_noise's, counted outside
    with HostSyncCounter() as forward:
        pending = [layer.compute(layer.start(part, 1, noise_keys_BS=k))
                   for part, k in zip(x.chunk(micro_batches, dim=1), keys.chunk(micro_batches, dim=1), strict=True)]
        y = torch.cat([layer.complete(p)[0] for p in pending], dim=1)
    grad = torch.randn_like(y)
    with HostSyncCounter() as backward:
        y.backward(grad)
    return forward, backward
