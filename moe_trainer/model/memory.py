"""What a forward pass leaves alive for its backward, by the module that made it.

Peak memory of a training step is, to first order, the activations the forward keeps
for backward. Saved-tensor hooks cannot count them all (a custom autograd function
may keep tensors on ``ctx``, and a recompute region hides its own), so this watches
storage: every tensor an op creates during the forward is recorded with the innermost
module running at the time, and whatever storage is still alive when the forward ends
is what the step holds until backward frees it. Used by ``benchmarks/memory.py`` to
find what dominates, and by the recompute tests to check each mode drops what it claims.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class _Created:
    ref: StorageWeakRef
    nbytes: int
    module: str
    op: str


@dataclass
class KeptActivations:
    """Bytes of forward-created storage still alive after the forward, by module name and by op."""

    by_module: dict[str, int] = field(default_factory=dict)
    by_op: dict[str, int] = field(default_factory=dict)  # ``module:op`` -> bytes

    @property
    def total(self) -> int:
        return sum(self.by_module.values())

    def matching(self, predicate: Callable[[str], bool]) -> int:
        return sum(n for name, n in self.by_module.items() if predicate(name))


class _Recorder(TorchDispatchMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.created: dict[int, _Created] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                seen = self.created.get(key)
                # views and in-place results share a live storage; a freed address may be handed out again
                if key and (seen is None or seen.ref.expired()):
                    self.created[key] = _Created(StorageWeakRef(storage), storage.nbytes(), self.stack[-1],
                                                 str(func.overloadpacket.__name__))
        return out


@contextmanager
def _module_stack(model: nn.Module) -> Iterator[list[str]]:
    stack = ["<outside modules>"]

    def enter(name: str) -> Callable[..., None]:
        return lambda module, args: stack.append(name)

    def leave(module: nn.Module, args: Any, output: Any) -> None:  # a hook returning a value would replace it
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name or "<root>")))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


def kept_activations(model: nn.Module, forward: Callable[[], Any]) -> tuple[Any, KeptActivations]:
    """Runs ``forward()`` (which must use ``model``) and returns its result and what it keeps alive.

    Storage still referenced by the returned result counts too (the loss, logits): keep
    the result alive only as long as the caller needs it for backward.
    """
    with _module_stack(model) as stack:
        recorder = _Recorder(stack)
        with recorder:
            result = forward()
    kept: dict[str, int] = defaultdict(int)
    by_op: dict[str, int] = defaultdict(int)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    for key, made in recorder.created.items():
        if not made.ref.expired() and key not in params:
            kept[made.module] += made.nbytes
            by_op[f"{made.module}:{made.op}"] += made.nbytes
    return result, KeptActivations(dict(kept), dict(by_op))
