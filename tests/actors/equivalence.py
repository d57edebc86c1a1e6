"""What the equivalence tests run and compare, written once.

``tests/actors/test_equivalence.py`` runs every case against ``single``;
``tests/actors/test_bugs_are_caught.py`` runs cases on a copy of the code with a bug
injected, through this module's command line::

    python -m tests.actors.equivalence LAYOUT MIX OUT.pt   # trace one layout, save it for comparison

Real Ray actors, real DeepSpeed (gloo) process groups, and no routing override:
routing groups are whole sequences and the load-balancing loss is global, so one
``single`` run per feature mix is the reference for every layout (docs/architecture.md,
"Routing groups"). Gradients are compared after step 1 with ``train.grad_clip=0``, so
nothing rescales them: a gradient scaled by 2, or reduced over the wrong group, fails.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_trainer.cli import make_engine
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.parallel.setup import world_size
from moe_trainer.train.sharded_checkpoint import read_entries
from tests.conftest import compose_dict
from tests.helpers import assert_rel_close, rel_error

STEPS = 4
REL = 1e-5  # fp32: sums in another order differ by ~1e-7 relative


@dataclass(frozen=True)
class Tolerance:
    """Relative tolerances of one precision."""

    grads: float  # every step-1 gradient tensor (norm of the difference / norm)
    records: float  # losses and grad_norm of every step
    state: float  # final weights and AdamW moments


FP32 = Tolerance(grads=REL, records=REL, state=1e-4)
# bf16 (8 mantissa bits, rounding 2^-9 = 2e-3 relative): every layout casts in the same places, so
# layouts differ only where a sum is cut differently (a rank's share of a weight gradient rounded to
# bf16 before the fp32 all-reduce, another row count in a bf16 matmul). Measured worst cases over the
# 8 layouts (docs/architecture.md, "Precision"): gradients 3.5e-3, losses 2.8e-5, grad_norm 5.8e-4,
# state 2.2e-2 (Adam turns a gradient entry near zero that rounds the other way into a full-size
# step). Set 3-4x above; a doubled or undivided gradient is off by 0.5-1 (tests/actors/test_bugs_are_caught.py).
BF16 = Tolerance(grads=1e-2, records=2e-3, state=1e-1)
BASE = ["experiment=debug", f"train.max_steps={STEPS}", "train.grad_clip=0", "train.batch_size=8",
        "train.warmup_steps=1", "parallel.cpus_per_actor=0.5"]

# Feature mixes: between them every router, score order, capacity and aux-loss scope, shared
# experts, a dense block between MoE blocks, and aux-loss-free bias balancing that moves (DeepSeek-V3's sign
# step here; the default's proportional step runs in RUN below, through moe-train), with selection noise
# (hashed from each row's tokens, so every rank and micro-batch must draw what single draws).
# Dropless also recomputes activations (block: every region up to an all-to-all, shared experts,
# the dense block) and accumulates gradients over two passes (the global aux loss per pass, bias
# loads summed over them); the single reference does the same. Every layout runs it, and at least
# one mix without either. Capacity (and clipped, built on it) also gives the routed experts a
# learning rate of their own (train.expert_lr_scale), which every process that updates experts applies,
# and the routers another (train.router_lr_scale), applied wherever the routers are updated.
MIXES = {
    "dropless": ["moe.score_order=topk_softmax", "moe.num_shared_experts=1", "moe.shared_expert_hidden=16",
                 "moe.bias_balancing=true", "moe.bias_update=sign", "moe.bias_update_rate=0.05", "moe.every=2",
                 "moe.selection_noise=0.1",
                 "train.recompute=block",
                 "train.grad_accum_steps=2"],
    "capacity": ["moe.capacity_factor=1.0", "moe.aux_loss_scope=group", "train.expert_lr_scale=3",
                 "train.router_lr_scale=0.3"],
    "switch": ["moe.router=switch", "moe.capacity_factor=1.25", "moe.routed_scale=4"],
    "expert_choice": ["moe.router=expert_choice"],
}
# Expert choice cuts each expert's tokens at a score rank, and on this corpus tokens tie there
# (runs of one byte at a sequence start have bit-identical states); after one update the weights
# differ by float rounding between layouts, which breaks such ties differently and sends whole
# tokens elsewhere. So expert choice is compared on its first step only (every gradient, every
# statistic), where both runs route from the same weights (docs/architecture.md, "Routing groups").
STEPS_OF = {"expert_choice": 1, "bf16": 2}
# train.precision=bf16 on the richest mix, over every layout, against single in bf16
MIXES["bf16"] = [*MIXES["dropless"], "train.precision=bf16"]
# gradient clipping on (below every step's norm): the clip is folded into the fused update, which a
# sharded optimizer runs on its own parameters only; the gradients compared are the clipped ones
CLIP = 0.5
MIXES["clipped"] = [*MIXES["capacity"], f"train.grad_clip={CLIP}"]
TOLERANCE_OF = {"bf16": BF16}
LAYOUTS = {  # name: (overrides, processes)
    "data_parallel": (["parallel=data_parallel", "parallel.num_actors=2"], 2),
    "expert_parallel": (["parallel=expert_parallel", "parallel.num_actors=2"], 2),
    "expert_parallel_chunks": (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.a2a_chunks=2"], 2),
    "expert_parallel_2mb": (["parallel=expert_parallel", "parallel.num_actors=2", "parallel.micro_batches=2"], 2),
    "expert_parallel_4_ep2": (["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2"], 4),
    # one expert per rank (4 experts): a rank's whole expert side is one expert, often idle with top-1
    "expert_parallel_4": (["parallel=expert_parallel", "parallel.num_actors=4"], 4),
    # ZeRO-1 (parallel.shard_optimizer): dense and expert state over 2 ranks; dense over 4, experts over 2
    "data_parallel_zero": (["parallel=data_parallel", "parallel.num_actors=2", "parallel.shard_optimizer=true"], 2),
    "expert_parallel_4_ep2_zero": (["parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2",
                                    "parallel.shard_optimizer=true"], 4),
    "disaggregated_1c": (["parallel=disaggregated", "parallel.num_coordinators=1"], 3),
    "disaggregated_1c_4mb": (["parallel=disaggregated", "parallel.num_coordinators=1",
                              "parallel.micro_batches=4"], 3),
    "disaggregated_2c_2mb": (["parallel=disaggregated", "parallel.num_coordinators=2",
                              "parallel.micro_batches=2"], 4),
    # more coordinators than expert actors: one expert actor serves both, regrouping their rows
    "disaggregated_2c_1e_2mb": (["parallel=disaggregated", "parallel.num_coordinators=2",
                                 "parallel.num_expert_actors=1", "parallel.micro_batches=2"], 3),
}


def default_routing() -> list[str]:
    """The ``moe.*`` overrides that give ``experiment=debug`` the default MoE (conf/moe/default.yaml) back.

    debug pins Mixtral's routing (4 experts, top-2, aux loss alone) so its runs export; the default's
    64 fine-grained experts with top-8 and the selection bias run on the same tiny model here.
    """
    default, debug = compose_dict([])["moe"], compose_dict(["experiment=debug"])["moe"]
    return [f"moe.{key}={value}" for key, value in default.items() if debug[key] != value]


# Whole ``moe-train`` runs (``moe_trainer.cli.train``, fresh actors) that tests of several files read, each trained
# once per session (``moe_train_run`` in tests/actors/conftest.py): 10 steps, clipping on, checkpoints at 5 and 10,
# the default MoE's routing and balancing
RUN_STEPS = 10
RUN = [f"train.max_steps={RUN_STEPS}", "train.checkpoint_every=5", f"train.eval_every={RUN_STEPS}", "train.log_every=1",
       "train.keep_last=0", "train.batch_size=8", *default_routing(), "parallel.cpus_per_actor=0.5"]
RUN_LAYOUTS = {  # the layouts a new user tries first (tests/actors/test_equivalence.py compares them with single)
    "expert_parallel_2mb": ["parallel=expert_parallel", "parallel.micro_batches=2"],
    "disaggregated_2mb": ["parallel=disaggregated", "parallel.micro_batches=2"],
}


@dataclass
class Trace:
    """What one run computed: per-step records, each process's step-1 gradients, the final state."""

    records: list[dict[str, Any]]
    grads: list[dict[str, torch.Tensor]]  # one dict per process
    state: dict[str, torch.Tensor]  # final checkpoint entries (model and optimizer)
    processes: int


class WarmActors:
    """Running TrainWorkers that a series of runs reuses (:class:`actors.group.ActorGroup`'s ``actors``).

    Starting a Ray worker and importing torch and DeepSpeed is paid once, not per run. An actor
    that a failed run killed or left stuck is replaced before the next run takes it, so one
    failure does not fail every case after it.
    """

    def __init__(self, count: int) -> None:
        self.cfg = to_dataclass(compose_dict(BASE))
        self.actors = [self._start(rank) for rank in range(count)]

    def _start(self, rank: int) -> Any:
        from actors.worker import TrainWorker

        return TrainWorker.options(num_cpus=0.5).remote(self.cfg, rank)

    def take(self, count: int) -> list[Any]:
        """The first ``count`` actors, each alive and answering."""
        import ray

        for rank in range(count):
            try:
                ray.get(self.actors[rank].rendezvous_address.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(self.actors[rank], no_restart=True)
                self.actors[rank] = self._start(rank)
        return self.actors[:count]

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def start(mix: str, *overrides: str, actors: WarmActors | None = None) -> Any:
    """The engine of a mix under ``overrides``; a Ray layout reuses ``actors`` when given."""
    cfg = to_dataclass(compose_dict([*BASE, *MIXES[mix], *overrides]))
    validate(cfg)
    if actors is not None and cfg.parallel.strategy != "single":
        from actors.engine import RayEngine

        return RayEngine(cfg, actors.take(world_size(cfg)))
    return make_engine(cfg)


def trace(directory: Path, mix: str, *overrides: str, actors: WarmActors | None = None) -> Trace:
    """Runs a mix under ``overrides``; a Ray layout reuses ``actors`` when given."""
    engine = start(mix, *overrides, actors=actors)
    try:
        records = engine.train(1)
        grads = engine.gradients()
        if STEPS_OF.get(mix, STEPS) > 1:
            records += engine.train(STEPS_OF.get(mix, STEPS) - 1)
        state = read_entries(engine.save(directory))
        processes = engine.info()["processes"]
    finally:
        engine.close()
    return Trace(records, grads, state, processes)


def merged_gradients(per_process: list[dict[str, torch.Tensor]], rel: float) -> dict[str, torch.Tensor]:
    """One tensor per key; every process holding a key (replicas) must hold the same gradient."""
    merged: dict[str, torch.Tensor] = {}
    for grads in per_process:
        for key, g in grads.items():
            if key in merged:
                assert_rel_close(g, merged[key], rel, f"replicas disagree on {key}")
            else:
                merged[key] = g
    return merged


def assert_same_run(got: Trace, ref: Trace, tol: Tolerance = FP32) -> float:
    """Asserts ``got`` computed what ``ref`` did (to ``tol``); returns the largest relative gradient difference."""
    grads, ref_grads = merged_gradients(got.grads, tol.grads), merged_gradients(ref.grads, tol.grads)
    assert grads.keys() == ref_grads.keys()
    for key, ref_g in ref_grads.items():
        assert_rel_close(grads[key], ref_g, tol.grads, key)
    assert [r["step"] for r in got.records] == [r["step"] for r in ref.records]
    for rec, ref_rec in zip(got.records, ref.records, strict=True):
        step = rec["step"]
        for key in ("loss", "aux_loss", "z_loss", "total_loss", "grad_norm"):
            assert rec[key] == pytest.approx(ref_rec[key], rel=tol.records, abs=1e-12), f"{key} at step {step}"
        assert rec["dropped_frac"] == pytest.approx(ref_rec["dropped_frac"], abs=1e-12), f"drops at step {step}"
        assert [layer["tokens_per_expert"] for layer in rec["layers"]] == [
            layer["tokens_per_expert"] for layer in ref_rec["layers"]], f"expert loads at step {step}"
        assert rec.get("expert_bias") == ref_rec.get("expert_bias"), f"bias at step {step}"
    assert got.state.keys() == ref.state.keys()
    for key, ref_t in ref.state.items():
        if ref_t.is_floating_point():
            assert_rel_close(got.state[key], ref_t, tol.state, key)  # moments too: relative, never an absolute 1e-6
        else:
            assert torch.equal(got.state[key], ref_t), key
    return max(rel_error(grads[k], ref_grads[k]) for k in ref_grads)


def save_trace(t: Trace, path: Path) -> None:
    """Writes a trace as plain tensors, lists and dicts (read back with ``weights_only``: nothing unpickled)."""
    torch.save({"records": t.records, "grads": t.grads, "state": t.state, "processes": t.processes}, path)


def load_trace(path: Path) -> Trace:
    return Trace(**torch.load(path, weights_only=True))


def main(argv: list[str]) -> None:
    """``LAYOUT MIX OUT``: traces one layout (on the cluster in ``RAY_ADDRESS`` if set) into ``OUT``."""
    layout, mix, out = argv
    out_path = Path(out)
    save_trace(trace(out_path.parent / "checkpoint", mix, *LAYOUTS[layout][0]), out_path)


if __name__ == "__main__":
    main(sys.argv[1:])
