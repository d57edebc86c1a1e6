"""Which placement-group bundle (and so which node) each rank gets: pure arithmetic, no Ray.

Ray places a job's bundles on nodes (``parallel.placement``: ``pack`` fills a node first,
``spread`` deals bundles out); the actor group then decides which rank runs in which bundle.
An expert-parallel group's all-to-alls move every routed token twice per layer and pass, the
heaviest traffic of a step, while an expert-data-parallel group meets once per step for a
gradient all-reduce; so an expert-parallel group is kept inside one node whenever one node
has bundles for all of it, and its ranks' expert-data-parallel peers then sit on the other
nodes. Disaggregated roles are sized apart and talk coordinator-to-expert-actor in every
layer; their ranks keep Ray's bundle order.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from moe_trainer.parallel.topology import Topology, ep_size, world_size

if TYPE_CHECKING:
    from moe_trainer.config.schema import Config


def rank_bundles(cfg: Config, bundle_nodes: list[str]) -> list[int]:
    """``bundle_nodes[b]``: the node bundle ``b`` was placed on; returns the bundle of each rank.

    Equal bundles only (data/expert parallel: every rank reserves the same): each expert-parallel
    group goes whole to the node with the fewest free bundles that still holds all of it (keeping
    room on the others for the next groups); a group no node holds fills the node with the most
    free bundles, then the next.
    """
    if cfg.parallel.strategy not in ("data_parallel", "expert_parallel"):
        return list(range(len(bundle_nodes)))
    topo = Topology(rank=0, world=world_size(cfg), ep_size=ep_size(cfg), num_experts=cfg.moe.num_experts)
    free: dict[str, list[int]] = defaultdict(list)
    for bundle, node in enumerate(bundle_nodes):
        free[node].append(bundle)
    order = [-1] * len(bundle_nodes)
    for group in topo.ep_groups():
        whole = [node for node, bundles in free.items() if len(bundles) >= len(group)]
        if whole:  # the fullest node that holds it whole: keeps the other nodes' room for the next groups
            node = min(whole, key=lambda n: (len(free[n]), bundle_nodes.index(n)))
            for rank in group:
                order[rank] = free[node].pop(0)
            continue
        node = None
        for rank in group:  # split: over as few nodes as the free bundles allow, the emptiest first
            if node is None or not free[node]:
                node = max(free, key=lambda n: (len(free[n]), -bundle_nodes.index(n)))
            order[rank] = free[node].pop(0)
    return order


def describe(rows: list[dict[str, Any]]) -> list[str]:
    """One line per node: its ranks with their role and experts (``rows`` as :func:`layout_rows` makes)."""
    by_node: dict[str, list[str]] = defaultdict(list)
    for row in rows:
        first, count = row["experts"]
        experts = f"experts {first}-{first + count - 1}" if count else "no experts"
        by_node[str(row["node"])].append(f"rank {row['rank']} {row['role']} ({experts})")
    return [f"{node}: {', '.join(ranks)}" for node, ranks in by_node.items()]


def layout_rows(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What each rank got, from the ranks' own join replies: node, rank, role, experts, pid."""
    return [{"rank": i["rank"], "node": i["node"], "role": i["role"], "experts": list(i["expert_range"]),
             "pid": i["pid"]} for i in infos]
