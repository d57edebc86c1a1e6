"""Which bundle (node) each rank gets: expert-parallel groups inside a node whenever a node holds them."""

from __future__ import annotations

from typing import Any

from moe_trainer.parallel.placement import describe, rank_bundles


def nodes_of(order: list[int], bundle_nodes: list[str]) -> list[str]:
    return [bundle_nodes[b] for b in order]


def test_expert_parallel_groups_stay_inside_a_node(make_config: Any) -> None:
    spread = ["A", "B", "A", "B"]  # what placement=spread gives 4 bundles on 2 nodes
    ep2 = make_config("parallel=expert_parallel", "parallel.num_actors=4", "parallel.ep_size=2")
    order = rank_bundles(ep2, spread)
    assert sorted(order) == [0, 1, 2, 3]
    placed = nodes_of(order, spread)
    assert placed[0] == placed[1] and placed[2] == placed[3] and placed[0] != placed[2]
    # a group no node holds whole fills the emptiest node first: 2 nodes per group, never 3
    uneven = ["A", "A", "A", "B", "B", "B", "C", "C"]
    ep4 = make_config("parallel=expert_parallel", "parallel.num_actors=8", "parallel.ep_size=4")
    placed = nodes_of(rank_bundles(ep4, uneven), uneven)
    assert len(set(placed[:4])) == 2 and len(set(placed[4:])) == 2
    # data parallel: groups of one, any order is as good; disaggregated keeps Ray's order
    assert sorted(rank_bundles(make_config("parallel=data_parallel", "parallel.num_actors=2"), ["A", "B"])) == [0, 1]
    assert rank_bundles(make_config("parallel=disaggregated"), ["B", "A", "B"]) == [0, 1, 2]


def test_the_layout_is_described_node_by_node() -> None:
    rows = [{"rank": 0, "node": "10.0.0.1", "role": "trainer", "experts": [0, 2]},
            {"rank": 1, "node": "10.0.0.1", "role": "trainer", "experts": [2, 2]},
            {"rank": 2, "node": "10.0.0.2", "role": "coordinator", "experts": [0, 0]}]
    assert describe(rows) == ["10.0.0.1: rank 0 trainer (experts 0-1), rank 1 trainer (experts 2-3)",
                              "10.0.0.2: rank 2 coordinator (no experts)"]
