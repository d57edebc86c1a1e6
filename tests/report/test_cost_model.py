"""The cost model's pipeline, its monotonicity, and its projection of both layouts (no Ray, no torch)."""

from __future__ import annotations

import pytest

from moe_trainer.report.cost_model import (
    Link,
    Machine,
    Pipeline,
    Shape,
    disaggregated,
    expert_parallel,
    gpu_machine,
    pipeline_time,
    with_link,
)

SHAPE = Shape(d_model=1024, n_layers=8, n_heads=16, seq_len=2048, vocab=32000, num_experts=16, top_k=2,
              expert_hidden=2048, tokens_per_step=8 * 16384, payload_bytes=2)
GPU = gpu_machine("test", 1e15, 0.4, Link(300e9, 10e-6), Link(40e9, 20e-6), 8, 3e12)


def test_one_micro_batch_is_the_serial_sum() -> None:
    p = Pipeline(coordinator=(1.0, 2.0, 3.0), expert=(4.0, 5.0), to_experts=0.5, to_coordinators=0.25,
                 micro_batches=1)
    assert pipeline_time(p) == pytest.approx(1 + 2 + 3 + 4 + 5 + 2 * (0.5 + 0.25))


def test_fill_and_drain_bubbles_by_hand() -> None:
    # coordinator 1 s a stage, experts 2 s, two micro-batches, one MoE layer:
    # c0(0) 0-1, c0(1) 1-2, e(0) 1-3, e(1) 3-5, c1(0) 3-4, c1(1) 5-6: 6 s, not max(4, 4) = 4
    assert pipeline_time(Pipeline((1.0, 1.0), (2.0,), 0.0, 0.0, 2)) == pytest.approx(6.0)
    # equal stages: one micro-batch leaves each resource idle half the time; two keep the coordinator busy
    assert pipeline_time(Pipeline((1.0,) * 4, (1.0,) * 3, 0.0, 0.0, 1)) == pytest.approx(7.0)
    assert pipeline_time(Pipeline((1.0,) * 4, (1.0,) * 3, 0.0, 0.0, 2)) == pytest.approx(8.0)


def test_disaggregated_step_is_more_than_the_busier_role() -> None:
    """The pipeline's waits are part of the step: dropping them would predict the busier role's work alone."""
    for m in (1, 2, 4, 8):
        p = disaggregated(SHAPE, GPU, 4, 4, m)
        busiest = max(p.terms["coordinator_compute"], p.terms["expert_busy"])
        assert p.terms["pipeline_wait"] > 0
        assert p.step_s > busiest + p.terms["optimizer"]
    one, four = disaggregated(SHAPE, GPU, 4, 4, 1), disaggregated(SHAPE, GPU, 4, 4, 4)
    assert four.step_s < one.step_s  # micro-batches hide expert compute behind attention


@pytest.mark.parametrize("layout", ["ep", "disagg"])
def test_monotone(layout: str) -> None:
    def step(shape: Shape = SHAPE, machine: Machine = GPU, imbalance: float = 1.0) -> float:
        if layout == "ep":
            return expert_parallel(shape, machine, 16, imbalance=imbalance).step_s
        return disaggregated(shape, machine, 8, 8, 4, imbalance=imbalance).step_s

    base = step()
    faster_links = [step(machine=with_link(GPU, bandwidth_scale=s)) for s in (0.25, 0.5, 1, 2, 8)]
    assert faster_links == sorted(faster_links, reverse=True) and faster_links[0] > faster_links[-1]
    slower_messages = [step(machine=with_link(GPU, latency_scale=s)) for s in (0, 1, 10)]
    assert slower_messages == sorted(slower_messages) and slower_messages[0] < slower_messages[-1]
    faster_gpus = [step(machine=gpu_machine("g", 1e15, mfu, GPU.intra, GPU.inter, 8, 3e12)) for mfu in (0.2, 0.4, 0.8)]
    assert faster_gpus == sorted(faster_gpus, reverse=True) and faster_gpus[0] > faster_gpus[-1]
    from dataclasses import replace

    assert step(shape=replace(SHAPE, tokens_per_step=2 * SHAPE.tokens_per_step)) > base
    assert step(shape=replace(SHAPE, expert_hidden=2 * SHAPE.expert_hidden)) > base
    assert step(imbalance=1.5) > base


def test_expert_parallel_within_a_node_moves_nothing_over_infiniband() -> None:
    slow_ib = Machine("m", 1e14, 1e14, 1e14, 1e14, 1e-11, Link(300e9, 1e-5), Link(1e3, 1.0), 8)
    inside = expert_parallel(SHAPE, slow_ib, 8)
    assert inside.terms["all_to_all"] < 1.0  # an InfiniBand this slow would cost seconds
    assert expert_parallel(SHAPE, slow_ib, 16).terms["all_to_all"] > 1.0


def test_expert_parallel_by_hand() -> None:
    """Two ranks on one node, every term written out."""
    shape = Shape(d_model=4, n_layers=1, n_heads=1, seq_len=1, vocab=1, num_experts=2, top_k=1, expert_hidden=1,
                  tokens_per_step=200, payload_bytes=1, grad_bytes=1)
    m = Machine("m", 1.0, 1.0, 1.0, 1.0, 0.0, Link(1.0, 0.0), Link(1.0, 0.0), 8)
    p = expert_parallel(shape, m, 2)
    # 100 tokens a rank, 100 rows routed, half of them (50 rows of 4 bytes) to the peer, four times
    assert p.terms["all_to_all"] == pytest.approx(4 * 50 * 4)
    assert p.terms["experts_fwd"] == pytest.approx(100 * 6 * 4)
    assert p.terms["dense_fwd"] == pytest.approx(100 * shape.dense_flops())
    assert p.terms["grad_sync"] == pytest.approx(shape.dense_params())  # ring: 2 (n-1)/n = 1 of the bytes


def test_invalid_layouts_are_refused() -> None:
    with pytest.raises(ValueError, match="must divide"):
        disaggregated(SHAPE, GPU, 3, 3, 1)
    with pytest.raises(ValueError, match="ep_size"):
        expert_parallel(SHAPE, GPU, 12)


@pytest.mark.parametrize("every,first_dense", [(1, 0), (2, 0), (1, 1), (1, 3), (2, 1), (3, 2)])
def test_the_cost_models_moe_layers_are_the_models(every: int, first_dense: int) -> None:
    """``Shape.moe_layers`` counts the blocks ``is_moe_block`` gives experts (``moe.every``, ``moe.first_dense``)."""
    from dataclasses import replace

    from moe_trainer.config.schema import MoEConfig
    from moe_trainer.model.transformer import is_moe_block

    moe = MoEConfig(every=every, first_dense=first_dense)
    shape = replace(SHAPE, moe_every=every, first_dense=first_dense)
    assert shape.moe_layers == sum(is_moe_block(i, moe) for i in range(SHAPE.n_layers))
