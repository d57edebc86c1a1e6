"""The dispatch protocol every distributed strategy speaks: counts, split sizes, regrouping, headers.

A dispatch moves rows that the local plan (:func:`~moe_trainer.moe.dispatcher.plan_dispatch`)
sorted by global expert, hence by owner, to the owners of those experts, and the results
back. Whatever carries the rows (an all-to-all, chunked all-to-alls, point-to-point sends
to expert actors), the same three facts decide what moves:

- the send counts, laid out per owner and local expert ``[P, L]``;
- the receive counts ``[P, L]``: how many rows each peer sends for each local expert
  (an all-to-all of the counts, or the headers of point-to-point messages);
- the regrouping of received rows from (peer, local expert) order into (local expert,
  peer) order, the order the single-process reference gives each expert's rows.

:class:`Route` holds them for one dispatch; every dispatcher and the expert actors'
server open theirs here. Point-to-point messages carry a :func:`header` so the receiving
expert actor learns phase, key and counts from the message itself instead of replaying the
coordinators' schedule.

Shape legend: P peers, L local experts per owner, M rows received, H header length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# Phases of a point-to-point message (the first header entry).
FORWARD, EVAL, BACKWARD = 0, 1, 2
PHASE_NAMES = {FORWARD: "forward", EVAL: "evaluation forward", BACKWARD: "backward"}
HEADER_PREFIX = 3  # phase, key, MoE block; the per-local-expert counts follow


def regroup_index(recv_counts_PL: Tensor, rows: int) -> Tensor:
    """Permutation from received order (peer, local expert) to (local expert, peer), on the counts' device.

    A stable sort keeps each peer's rows in its own priority order, and peers in rank
    order, which is the order the single-process reference gives each expert's rows.
    ``rows`` (the received total, known on the host from the split sizes) fixes the
    output length, so building the index never reads the device.
    """
    peers, local = recv_counts_PL.shape
    local_ids_PL = torch.arange(local, device=recv_counts_PL.device).repeat(peers)
    local_expert_M = torch.repeat_interleave(local_ids_PL, recv_counts_PL.flatten(), output_size=rows)
    return torch.argsort(local_expert_M, stable=True)


@dataclass(frozen=True)
class Route:
    """One dispatch seen from one rank: rows to and from each peer, and the regrouping of what arrived."""

    send_splits: list[int]  # rows this rank sends each peer
    recv_splits: list[int]  # rows this rank receives from each peer
    regroup_idx_M: Tensor | None  # received (peer, local expert) order -> (local expert, peer); None: the same
    counts_L: Tensor  # rows per local expert once regrouped: the experts' run lengths (on the device)

    @classmethod
    def open(cls, send_counts_PL: Tensor, recv_counts_PL: Tensor) -> Route:
        """From the counts on the device: the split sizes are read to the host together (one read)."""
        both = torch.stack([send_counts_PL.sum(1), recv_counts_PL.sum(1)]).tolist()
        return cls.received(both[0], both[1], recv_counts_PL)

    @classmethod
    def received(cls, send_splits: list[int], recv_splits: list[int], recv_counts_PL: Tensor) -> Route:
        """From split sizes already on the host (a header read them).

        Rows from a single peer arrive in local-expert order already (a disaggregated expert
        actor serving one coordinator): no regrouping, which saves two passes over the rows.
        """
        one_peer = recv_counts_PL.shape[0] == 1
        regroup = None if one_peer else regroup_index(recv_counts_PL, sum(recv_splits))
        return cls(send_splits, recv_splits, regroup, recv_counts_PL.sum(0))

    def to_experts(self, x_peer_MD: Tensor) -> Tensor:
        """Received rows in the order the local experts run them."""
        return x_peer_MD if self.regroup_idx_M is None else x_peer_MD.index_select(0, self.regroup_idx_M)

    def to_peers(self, y_MD: Tensor) -> Tensor:
        """Expert-ordered rows back in received order, ready to return to each peer."""
        if self.regroup_idx_M is None:
            return y_MD
        return torch.empty_like(y_MD).index_copy(0, self.regroup_idx_M, y_MD)


def header(phase: int, key: int, layer: int, counts_PL: Tensor) -> Tensor:
    """One header per destination ``[P, 3 + L]``: ``(phase, key, MoE block, rows per local expert...)``, on the
    counts' device (NCCL moves only device tensors)."""
    headers = counts_PL.new_empty(counts_PL.shape[0], HEADER_PREFIX + counts_PL.shape[1])
    for column, value in enumerate((phase, key, layer)):  # scalar fills: no host-to-device copy to wait for
        headers[:, column] = value
    headers[:, HEADER_PREFIX:] = counts_PL
    return headers
