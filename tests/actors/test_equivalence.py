"""Every Ray strategy computes what ``single`` computes: every gradient, loss, norm, bias, drop and final state.

The runs, feature mixes, layouts and tolerances are in ``tests/actors/equivalence.py``;
``tests/actors/test_bugs_are_caught.py`` injects gradient bugs and checks that these
comparisons fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from moe_trainer.train.sharded_checkpoint import read_entries
from tests.actors.equivalence import (
    CLIP,
    FP32,
    LAYOUTS,
    REL,
    RUN_LAYOUTS,
    RUN_STEPS,
    TOLERANCE_OF,
    WarmActors,
    assert_same_run,
    start,
    trace,
)

# Every layout with both dispatch modes (dropless with bias, shared experts, a dense block, recompute
# and accumulation; capacity with drops, plain) but capacity on disaggregated_1c_4mb, whose plain
# case is switch; the other routers on layouts that cover each dispatcher and schedule (chunked,
# asynchronous, expert-data-parallel replicas, micro-batched and multi-coordinator disaggregated, more
# coordinators than expert actors; one expert per rank with top-1 switch routing);
# bf16 (2 steps) on every strategy and every dispatcher: the synchronous one (4 actors with replicas,
# disaggregated coordinators), the chunked and the asynchronous one, and the expert actors' side.
# Sharded optimizer state (ZeRO-1, the *_zero layouts): with clipping on 4 ranks here (dense state over
# 4, experts over their 2 replicas), data_parallel below with its memory, and checkpoints sharded <-> not.
# 29 runs: the whole matrix would cost CI minutes and test the same code.
CASES = [(layout, mix) for layout in LAYOUTS if not layout.endswith("_zero") and layout != "expert_parallel_4"
         for mix in ("dropless", "capacity") if (layout, mix) != ("disaggregated_1c_4mb", "capacity")]
CASES += [(layout, "switch") for layout in ("expert_parallel_chunks", "expert_parallel_4", "disaggregated_1c_4mb")]
CASES += [(layout, "expert_choice") for layout in ("data_parallel", "expert_parallel_2mb", "disaggregated_2c_2mb")]
CASES += [(layout, "bf16") for layout in ("data_parallel", "expert_parallel_chunks", "expert_parallel_2mb",
                                          "expert_parallel_4_ep2", "disaggregated_2c_2mb")]
CASES += [("expert_parallel_4_ep2_zero", "clipped")]


@pytest.fixture(scope="module")
def warm_actors(ray_cluster: object) -> Iterator[WarmActors]:
    """Four TrainWorkers that every case reuses (each leaves its process group after a case and joins
    the next). The whole ``moe-train`` path with fresh actors runs below and in the other tests."""
    actors = WarmActors(4)
    yield actors
    actors.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout,mix", CASES, ids=[f"{layout}-{mix}" for layout, mix in CASES])
def test_layout_computes_what_single_computes(warm_actors: WarmActors, reference: Any, tmp_path: Path, layout: str,
                                              mix: str) -> None:
    overrides, processes = LAYOUTS[layout]
    ref = reference(mix)
    got = trace(tmp_path, mix, *overrides, actors=warm_actors)
    assert got.processes == processes
    worst = assert_same_run(got, ref, TOLERANCE_OF.get(mix, FP32))
    if mix == "bf16":  # every row a rank sends is bf16: 2 bytes per element (d_model=32)
        assert all(r["a2a_bytes_sent"] == 2 * 32 * r["a2a_rows_sent"] for r in got.records)
    print(f"{layout}/{mix}: largest relative gradient difference {worst:.2e}")


@pytest.mark.slow
def test_sharded_optimizer_halves_dense_state_with_equal_losses(warm_actors: WarmActors, reference: Any,
                                                                tmp_path: Path) -> None:
    """ZeRO-1 over 2 data-parallel ranks: what single computes, with half the dense optimizer state per rank."""
    ref = reference("dropless")
    got = trace(tmp_path, "dropless", *LAYOUTS["data_parallel_zero"][0], actors=warm_actors)
    assert_same_run(got, ref, FP32)
    whole, per_rank = ref.records[-1]["mem_optim_dense_state_mb"], got.records[-1]["mem_optim_dense_state_mb_per_rank"]
    assert sum(per_rank) == pytest.approx(whole, rel=1e-12)  # every dense parameter's state, exactly once
    ratio = max(per_rank) / whole
    assert 0.5 <= ratio < 0.51, per_rank  # whole tensors, largest first: the debug model cuts within 1 %
    print(f"dense optimizer state per rank: {max(per_rank):.4f} MiB of {whole:.4f} MiB (ratio {ratio:.4f}); "
          f"all state {got.records[-1]['mem_optim_state_mb_per_rank']} MiB of {ref.records[-1]['mem_optim_state_mb']}")


def _checkpoint_then_step(engine: Any, root: Path, load: Path | None = None, steps: int = 0) -> tuple[Path, Any]:
    """``engine`` loads ``load`` (None: trains ``steps`` first), saves under ``root``, then trains one step
    after a load; returns the checkpoint and that step's records. Closes the engine."""
    try:
        if load is not None:
            engine.load(load)
        else:
            engine.train(steps)
        path = engine.save(root)
        return path, engine.train(1) if load is not None else []
    finally:
        engine.close()


@pytest.mark.slow
def test_sharded_checkpoints_load_into_any_layout(warm_actors: WarmActors, tmp_path: Path) -> None:
    """Saved sharded (data_parallel) -> loaded and saved by single -> loaded and saved sharded by 4 expert-parallel
    ranks: the same entries bit for bit each time, and the next step of single and of the sharded ranks agree."""
    mix, steps = "capacity", 2
    saved, _ = _checkpoint_then_step(start(mix, *LAYOUTS["data_parallel_zero"][0], actors=warm_actors),
                                     tmp_path / "data_parallel_zero", steps=steps)
    resaved, ref = _checkpoint_then_step(start(mix), tmp_path / "single", load=saved)
    again, got = _checkpoint_then_step(start(mix, *LAYOUTS["expert_parallel_4_ep2_zero"][0], actors=warm_actors),
                                       tmp_path / "expert_parallel_4_ep2_zero", load=resaved)
    first = read_entries(saved)
    for path in (resaved, again):
        entries = read_entries(path)
        assert entries.keys() == first.keys()
        for key, tensor in first.items():
            assert torch.equal(entries[key], tensor), f"{path.parent.name}: {key}"
    assert got[0]["step"] == ref[0]["step"] == steps + 1
    for key in ("loss", "grad_norm"):
        assert got[0][key] == pytest.approx(ref[0][key], rel=REL), key


@pytest.mark.slow
def test_init_from_starts_every_layout_from_the_same_weights(warm_actors: WarmActors, tmp_path: Path) -> None:
    """``train.init_from`` under sharded experts (4 expert-parallel ranks, disaggregated expert actors): each
    process reads its own experts, and the step-0 checkpoint and the first step are single's."""
    from moe_trainer.hub.export import export
    from moe_trainer.model.transformer import Transformer
    from moe_trainer.train.sharded_checkpoint import model_entries
    from tests.helpers import train_checkpoint

    hub = tmp_path / "hf"
    export(str(train_checkpoint(tmp_path / "trained", steps=2)), hub)
    init = [f"train.init_from={hub}", "train.seed=5"]  # another seed: the weights must come from the checkpoint

    def step_zero_then_one_step(engine: Any, name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        try:
            state = read_entries(engine.save(tmp_path / name))
            return {k: v for k, v in state.items() if k.startswith("model/")}, engine.train(1)[0]
        finally:
            engine.close()

    ref_state, ref_step = step_zero_then_one_step(start("capacity", *init), "single")
    seeded = Transformer(*_model_settings(), 257, seed=5)
    assert not torch.equal(model_entries(seeded)["embed.weight"], ref_state["model/embed.weight"])
    for layout in ("expert_parallel_4_ep2", "disaggregated_2c_1e_2mb"):
        state, step = step_zero_then_one_step(start("capacity", *LAYOUTS[layout][0], *init, actors=warm_actors),
                                              layout)
        for key, tensor in ref_state.items():
            assert torch.equal(state[key], tensor), f"{layout}: {key}"
        for key in ("loss", "grad_norm"):
            assert step[key] == pytest.approx(ref_step[key], rel=REL), f"{layout}: {key}"


def _model_settings() -> tuple[Any, Any]:
    from moe_trainer.config.schema import to_dataclass
    from tests.conftest import compose_dict

    cfg = to_dataclass(compose_dict(["experiment=debug"]))
    return cfg.model, cfg.moe


def test_the_mixes_exercise_what_they_claim(reference: Any) -> None:
    """The reference runs really drop tokens, move the bias and route to every expert's owner."""
    capacity, dropless = reference("capacity"), reference("dropless")
    assert all(r["dropped_frac"] > 0.01 for r in capacity.records)
    assert all(r["dropped_frac"] == 0 for r in dropless.records)
    for mix in ("dropless", "capacity", "switch"):  # the trainer really adds a load-balancing loss (~1)
        assert all(r["aux_loss"] > 0.5 for r in reference(mix).records), mix
    assert all(r["aux_loss"] == 0 for r in reference("expert_choice").records)  # balanced by construction
    assert all(v != 0 for layer in dropless.records[0]["expert_bias"] for v in layer)  # moved after step 1
    assert {k.split("/")[1] for k in dropless.grads[0] if "shared" in k}  # the shared expert has gradients
    assert all(r["grad_norm"] > CLIP for r in reference("clipped").records)  # the clip acts at every step


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(RUN_LAYOUTS))
def test_moe_train_matches_single_with_the_default_moe(moe_train_run: Any, layout: str) -> None:
    """The layouts a new user tries first, through the whole ``moe-train`` path, with the default MoE (64 experts,
    top-8, the selection bias and the aux loss; clipping on). 4 actors with
    ep_size=2 through ``moe-train``, on two nodes: tests/actors/test_multi_node.py."""
    ref = moe_train_run()[1].train_records  # single
    got = moe_train_run(*RUN_LAYOUTS[layout])[1].train_records
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(1, RUN_STEPS + 1))
    assert any(r["grad_norm"] > 1.0 for r in ref)  # the clip is active: the norm itself must match
    for rec, ref_rec in zip(got, ref, strict=True):
        for key in ("loss", "grad_norm"):
            assert rec[key] == pytest.approx(ref_rec[key], rel=REL), f"{key} at step {rec['step']}"
    worst = max(abs(rec[key] / ref_rec[key] - 1) for rec, ref_rec in zip(got, ref, strict=True)
                for key in ("loss", "grad_norm"))
    print(f"{layout}: largest relative loss/grad_norm difference over {RUN_STEPS} steps {worst:.2e}")
