"""Host syncs per MoE layer stay at what the variable split sizes need (counted on the CPU).

A host sync is free on the CPU and stalls a GPU's launch queue, so it is counted here
(:mod:`moe_trainer.host_syncs`) and the counts are held: a new ``.item()``, ``.tolist()``,
``bincount`` or unsized ``repeat_interleave`` in the layer fails this test, and so does a
read of their run lengths by the experts (``moe/experts.py``), which take them as a device
tensor (``grouped_mm`` offsets).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from moe_trainer.config.schema import MoEConfig
from moe_trainer.host_syncs import HostSyncCounter, moe_layer_syncs
from moe_trainer.moe.dispatcher import Dispatcher
from moe_trainer.parallel.async_a2a import AsyncAllToAllTransport
from moe_trainer.parallel.dispatcher import AllToAllTransport
from moe_trainer.parallel.overlap import ChunkedAllToAllTransport

EXPERTS = 4
EXPERT_CODE = ("moe_trainer/moe/experts.py", "moe_trainer/moe/expert_kernels.py")


def test_the_counter_sees_every_kind_of_host_read() -> None:
    t = torch.tensor([1, 0, 2])
    with HostSyncCounter() as syncs:
        t[0].item()
        t.tolist()
        bool(t[1])
        t.cpu()
        t.nonzero()
        t[t > 0]
        torch.bincount(t)
        torch.repeat_interleave(t, t)
        torch.repeat_interleave(t, t, output_size=3)  # sized: no read
        t.sum() + 1  # plain device work: no read
    assert [e.kind for e in syncs.events] == ["item", "tolist", "item", "cpu", "nonzero", "boolean_mask",
                                              "bincount", "repeat_interleave"]
    assert t.tolist() == [1, 0, 2]  # the patched methods are restored


@pytest.fixture
def group(one_rank_gloo: Any) -> Any:
    return one_rank_gloo


# (path, capacity factor, micro-batches, syncs outside the experts in forward): one read of the split sizes per
# all-to-all exchange (per micro-batch), one more with a capacity factor (the kept rows' count); none in backward
CASES = [
    ("single", None, 1, 0),
    ("single", 1.0, 1, 1),
    ("expert_parallel", None, 1, 1),
    ("expert_parallel", 1.0, 1, 2),
    ("a2a_chunks=2", None, 1, 1),
    ("a2a_chunks=2", 1.0, 1, 2),
    ("micro_batches=2", None, 2, 2),
    ("micro_batches=2", 1.0, 2, 4),
]


@pytest.mark.parametrize("path,cf,micro,expected", CASES, ids=[f"{c[0]}-cf{c[1]}" for c in CASES])
def test_host_syncs_per_moe_layer(group: Any, path: str, cf: float | None, micro: int, expected: int) -> None:
    dispatcher = {
        "single": lambda: None,
        "expert_parallel": lambda: Dispatcher(EXPERTS, cf, AllToAllTransport(group, 1, 0, EXPERTS)),
        "a2a_chunks=2": lambda: Dispatcher(EXPERTS, cf, ChunkedAllToAllTransport(group, 1, 0, EXPERTS, 2)),
        "micro_batches=2": lambda: Dispatcher(EXPERTS, cf, AsyncAllToAllTransport(group, 1, 0, EXPERTS)),
    }[path]()
    # selection noise on (the default's), so its hashing is counted: it must read nothing back
    cfg = MoEConfig(num_experts=EXPERTS, top_k=2, expert_hidden=16, capacity_factor=cf, selection_noise=0.01)
    forward, backward = moe_layer_syncs(cfg, dispatcher, micro_batches=micro)
    assert forward.count(exclude=EXPERT_CODE) == expected, forward.by_place()
    # the grouped experts take their run lengths as a device tensor: no read of their own in forward;
    # on the CPU their weight gradients may go per expert (written in place into .grad, see
    # expert_kernels.expert_weight_grad), which reads the run lengths once per expert backward call
    assert forward.count() == forward.count(exclude=EXPERT_CODE), forward.by_place()
    assert backward.count(exclude=EXPERT_CODE) == 0, backward.by_place()
    calls = micro * (2 if path == "a2a_chunks=2" else 1)  # one expert backward per micro-batch and chunk
    assert backward.count() <= calls, backward.by_place()
