"""A step-time model of ``expert_parallel`` and ``disaggregated``: FLOPs and bytes in, seconds out.

The point is to say which layout wins on a machine we do not have. Everything a step does is
written as work (FLOPs, bytes, parameters) from the model's shape and the layout, and turned
into time by a :class:`Machine`: achieved FLOP/s per kind of work, a link's bandwidth and
latency, the optimizer's cost per parameter. The same formulas serve this CPU (rates fitted
from its timelines: :mod:`moe_trainer.report.calibration`) and a GPU cluster (rates = peak x
an assumed MFU), so a check of the formulas here is a check of the projection's structure.

What a step is, per layout (as the trainers run it today):

* ``expert_parallel`` (P ranks, ``micro_batches=1``): each rank runs the dense part for T/P
  tokens; per MoE layer a blocking count exchange and all-to-all dispatch, the local experts,
  and the combine; backward the same with backward costs; then the dense gradients are
  all-reduced over P (expert gradients over their replicas when ``ep_size < P``), the grad
  norm, the optimizer, and two small all-reduces (router loads, losses). The slowest rank sets
  every layer's pace (all-to-alls synchronise), so expert work is the mean times an imbalance.
* ``disaggregated`` (C coordinators, X expert actors, M micro-batches): per micro-batch a chain
  coordinator stage -> rows to experts -> expert stage -> rows back -> next coordinator stage,
  with the coordinators taking stages layer by layer, micro-batch by micro-batch (the order
  their autograd graph gives) and the expert actors serving in arrival order. That is a
  two-resource pipeline; :func:`pipeline_time` runs it as a list schedule, so fill and drain
  bubbles come out of the dependencies instead of a formula that would have to guess them.

Shape suffixes are not used here: everything is a scalar per rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

STATE_BYTES_PER_PARAM = 16  # bf16 weights + fp32 master + AdamW m and v + bf16 grads (fp32 runs: 16 as well)


@dataclass(frozen=True)
class Shape:
    """The model and batch a step runs: what sets its FLOPs, bytes and parameters."""

    d_model: int
    n_layers: int
    n_heads: int
    seq_len: int
    vocab: int
    num_experts: int
    top_k: int
    expert_hidden: int
    tokens_per_step: int  # the global batch, in tokens
    n_kv_heads: int | None = None  # grouped-query attention (Mixtral: 8 of 32); None = n_heads
    moe_every: int = 1  # the FFN of every moe_every-th block is MoE, the rest dense
    first_dense: int = 0  # ... past the first first_dense blocks, which are dense
    ffn_hidden: int = 0  # dense FFN width of the non-MoE blocks
    payload_bytes: int = 4  # bytes per element of rows on the wire: 4 fp32, 2 bf16
    grad_bytes: int = 4  # bytes per element of all-reduced gradients (fp32 master weights)

    @property
    def moe_layers(self) -> int:
        return sum(1 for i in range(self.first_dense, self.n_layers)
                   if (i + 1) % self.moe_every == 0)  # as model.is_moe_block

    @property
    def row_bytes(self) -> int:
        """One token row on the wire (dispatch, combine, and their gradients)."""
        return self.d_model * self.payload_bytes

    @property
    def kv_dim(self) -> int:
        return self.d_model * (self.n_kv_heads or self.n_heads) // self.n_heads

    def attention_flops(self) -> float:
        """Forward FLOPs per token of one block's attention: Q, O (d x d), K, V (d x kv), scores and
        values over the whole sequence (counted in full, as the CPU math path computes it)."""
        d = self.d_model
        return 2 * (2 * d * d + 2 * d * self.kv_dim) + 4 * self.seq_len * d

    def head_flops(self) -> float:
        """Forward FLOPs per token of the LM head (the embedding lookup costs none)."""
        return 2 * self.d_model * self.vocab

    def dense_flops(self) -> float:
        """Forward FLOPs per token of everything but the experts: what a coordinator (or an
        expert-parallel rank besides its experts) computes."""
        dense_ffn = (self.n_layers - self.moe_layers) * 6 * self.d_model * self.ffn_hidden
        router = self.moe_layers * 2 * self.d_model * self.num_experts
        return self.n_layers * self.attention_flops() + dense_ffn + router + self.head_flops()

    def expert_flops(self) -> float:
        """Forward FLOPs of one routed row through one SwiGLU expert (three d x h matmuls)."""
        return 6 * self.d_model * self.expert_hidden

    def dense_params(self) -> int:
        d = self.d_model
        attention = self.n_layers * (2 * d * d + 2 * d * self.kv_dim)
        dense_ffn = (self.n_layers - self.moe_layers) * 3 * d * self.ffn_hidden
        return 2 * self.vocab * d + attention + dense_ffn + self.moe_layers * d * self.num_experts

    def expert_params(self) -> int:
        """Parameters of one expert index across all MoE layers (a rank holding e experts holds e x this)."""
        return self.moe_layers * 3 * self.d_model * self.expert_hidden


@dataclass(frozen=True)
class Link:
    """One device's path to a peer: bytes per second in one direction, and seconds per message."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class Machine:
    """Achieved per-device rates, so that time = work / rate.

    For this CPU they are fitted (:mod:`moe_trainer.report.calibration`); for a GPU cluster they
    are the device's peak times an assumed MFU. Dense and expert work keep separate rates
    because they run different kernels (attention and a large vocabulary matmul vs grouped
    matmuls over a few thousand rows), and forward and backward too.
    """

    name: str
    dense_fwd: float  # FLOP/s
    dense_bwd: float
    expert_fwd: float
    expert_bwd: float
    optimizer_s_per_param: float
    intra: Link  # between devices of one node
    inter: Link  # between nodes
    devices_per_node: int
    step_overhead_s: float = 0.0  # per step, outside every timed region (data batch, zero_grad, lr)

    def transfer(self, bytes_in_node: float, bytes_off_node: float, messages: int = 1) -> float:
        """Seconds to move bytes to peers, the in-node and off-node parts at once on their own links;
        ``messages`` in a row that each wait for the slower link's latency."""
        if bytes_in_node <= 0 and bytes_off_node <= 0:
            return 0.0
        latency = self.inter.latency if bytes_off_node > 0 else self.intra.latency
        return messages * latency + max(bytes_in_node / self.intra.bandwidth, bytes_off_node / self.inter.bandwidth)

    def all_reduce(self, nbytes: float, ranks: int, spans_nodes: bool) -> float:
        """Ring all-reduce bandwidth term (2 (n-1)/n of the bytes) plus a tree's 2 log2(n) latencies."""
        if ranks <= 1:
            return 0.0
        link = self.inter if spans_nodes else self.intra
        return 2 * math.ceil(math.log2(ranks)) * link.latency + 2 * (ranks - 1) / ranks * nbytes / link.bandwidth


@dataclass(frozen=True)
class Prediction:
    """A predicted step: its total and the terms it is made of (seconds, per step)."""

    layout: str
    step_s: float
    tokens_per_s: float
    terms: dict[str, float] = field(default_factory=dict)
    state_gb_per_device: float = 0.0  # weights, gradients and optimizer state of the busiest rank


def _nodes(ranks: int, machine: Machine) -> int:
    return max(1, math.ceil(ranks / machine.devices_per_node))


def expert_parallel(shape: Shape, machine: Machine, ranks: int, ep_size: int | None = None,
                    imbalance: float = 1.0) -> Prediction:
    """Step time of ``expert_parallel`` on ``ranks`` devices (``micro_batches=1``, no chunked overlap).

    ``ep_size`` ranks split the experts (default: all ranks, at most one expert each);
    ``imbalance`` is the busiest rank's expert rows over the mean, per layer.
    """
    ep = ep_size or min(ranks, shape.num_experts)
    if shape.num_experts % ep or ranks % ep:
        raise ValueError(f"ep_size {ep} must divide num_experts ({shape.num_experts}) and ranks ({ranks})")
    tokens = shape.tokens_per_step / ranks
    rows = tokens * shape.top_k  # rows this rank routes, and on average receives, per MoE layer
    # uniform routing over the ep group: 1/ep of the rows stay, the rest go to peers in and off the node
    in_node_peers = min(ep, machine.devices_per_node) - 1
    off_node_peers = ep - 1 - in_node_peers
    moved = rows * shape.row_bytes
    # the count exchange (one latency), then the rows; nothing moves when one rank holds every expert
    count_exchange = 0.0 if ep == 1 else machine.inter.latency if off_node_peers else machine.intra.latency
    a2a = count_exchange + machine.transfer(moved * in_node_peers / ep, moved * off_node_peers / ep)
    expert_rows = rows * imbalance
    layers = shape.moe_layers
    terms = {
        "dense_fwd": tokens * shape.dense_flops() / machine.dense_fwd,
        "dense_bwd": tokens * 2 * shape.dense_flops() / machine.dense_bwd,
        "experts_fwd": layers * expert_rows * shape.expert_flops() / machine.expert_fwd,
        "experts_bwd": layers * expert_rows * 2 * shape.expert_flops() / machine.expert_bwd,
        "all_to_all": layers * 4 * a2a,  # dispatch and combine, forward and backward, none overlapped
    }
    spans_nodes = ranks > machine.devices_per_node
    replicas = ranks // ep
    expert_params = shape.num_experts // ep * shape.expert_params()
    terms["grad_sync"] = (machine.all_reduce(shape.dense_params() * shape.grad_bytes, ranks, spans_nodes)
                          + machine.all_reduce(expert_params * shape.grad_bytes, replicas, spans_nodes))
    terms["small_all_reduces"] = 3 * machine.all_reduce(8, ranks, spans_nodes)  # grad norm, router loads, losses
    params = shape.dense_params() + expert_params
    terms["optimizer"] = params * machine.optimizer_s_per_param
    terms["overhead"] = machine.step_overhead_s
    step = sum(terms.values())
    return Prediction(f"expert_parallel x{ranks}", step, shape.tokens_per_step / step, terms,
                      params * STATE_BYTES_PER_PARAM / 1e9)


@dataclass(frozen=True)
class Pipeline:
    """Two resources and M chains of alternating stages: coordinator stage j, transfer, expert stage j,
    transfer, coordinator stage j+1, ... (``len(coordinator) == len(expert) + 1``). Seconds per
    micro-batch; the same for every micro-batch."""

    coordinator: tuple[float, ...]  # stage j: what runs before dispatch j (the last one: after the last combine)
    expert: tuple[float, ...]
    to_experts: float  # transfer of one micro-batch's rows to the expert actors
    to_coordinators: float  # and back
    micro_batches: int


def pipeline_time(p: Pipeline) -> float:
    """Makespan of the pipeline as the trainers schedule it.

    The coordinator takes its stages stage by stage, micro-batch by micro-batch (stage j of
    every micro-batch before stage j+1 of any), and the expert actor serves rows in the order
    they arrive, which is the same order. Each task starts when its resource is free and its
    input has arrived; transfers overlap compute (they run on the links). With one
    micro-batch this is the serial sum; with many, the bubbles are the time a resource waits
    at the ends (fill and drain) and wherever the other stage is slower.
    """
    m = p.micro_batches
    coord_free = expert_free = 0.0
    ready = [0.0] * m  # when micro-batch i's input for its next coordinator stage has arrived
    for j, stage in enumerate(p.coordinator):
        sent = []
        for i in range(m):
            coord_free = max(coord_free, ready[i]) + stage
            sent.append(coord_free + p.to_experts)
        if j == len(p.expert):
            break
        for i in range(m):
            expert_free = max(expert_free, sent[i]) + p.expert[j]
            ready[i] = expert_free + p.to_coordinators
    return coord_free


def disaggregated(shape: Shape, machine: Machine, coordinators: int, expert_actors: int, micro_batches: int,
                  imbalance: float = 1.0) -> Prediction:
    """Step time of ``disaggregated`` with C coordinators, X expert actors and M micro-batches.

    Forward and backward are each one :class:`Pipeline` (backward: the same chains, reversed,
    with backward costs); the backward starts when the forward has ended (the loss needs
    every micro-batch). Then the coordinators all-reduce their dense gradients, every rank
    joins the grad-norm all-reduce, both roles run their optimizer at once, and the
    coordinators all-reduce router loads and losses.
    """
    c, x, m = coordinators, expert_actors, micro_batches
    if shape.num_experts % x:
        raise ValueError(f"expert actors ({x}) must divide num_experts ({shape.num_experts})")
    tokens = shape.tokens_per_step / (c * m)  # per coordinator and micro-batch
    layers = shape.moe_layers
    # the dense work split into a stage per MoE layer (attention, router) and a last one (norm, LM head)
    per_layer = (shape.dense_flops() - shape.head_flops()) / layers
    coord_fwd = tuple([tokens * per_layer / machine.dense_fwd] * layers + [tokens * shape.head_flops()
                                                                           / machine.dense_fwd])
    # backward runs the chain the other way: LM head first, the first block's attention last
    coord_bwd = tuple(2 * s * machine.dense_fwd / machine.dense_bwd for s in reversed(coord_fwd))
    rows = shape.tokens_per_step * shape.top_k / (x * m) * imbalance  # per expert actor and micro-batch
    expert_fwd = rows * shape.expert_flops() / machine.expert_fwd
    expert_bwd = rows * 2 * shape.expert_flops() / machine.expert_bwd
    # interleaved placement: each node holds its share of both roles, so 1/nodes of the peers are local
    nodes = _nodes(c + x, machine)
    local = 1.0 / nodes
    # a link carries the larger of a coordinator's outgoing and an expert actor's incoming rows
    nbytes = max(tokens * shape.top_k, rows) * shape.row_bytes
    to_experts = machine.transfer(nbytes * local, nbytes * (1 - local), messages=2)  # header, then rows
    back = machine.transfer(nbytes * local, nbytes * (1 - local))
    fwd = pipeline_time(Pipeline(coord_fwd, (expert_fwd,) * layers, to_experts, back, m))
    bwd = pipeline_time(Pipeline(coord_bwd, (expert_bwd,) * layers, to_experts, back, m))
    coord_busy = m * (sum(coord_fwd) + sum(coord_bwd))
    expert_busy = m * layers * (expert_fwd + expert_bwd)
    spans_nodes = nodes > 1
    coord_params = shape.dense_params()
    expert_params = shape.num_experts // x * shape.expert_params()
    terms = {
        "coordinator_compute": coord_busy,
        # what the pipeline adds to the coordinator's own work: waiting for experts and rows
        "pipeline_wait": fwd + bwd - coord_busy,
        "grad_sync": machine.all_reduce(coord_params * shape.grad_bytes, c, spans_nodes),
        "small_all_reduces": (machine.all_reduce(8, c + x, spans_nodes)
                              + 2 * machine.all_reduce(8, c, spans_nodes)),
        "optimizer": max(coord_params, expert_params) * machine.optimizer_s_per_param,
        "overhead": machine.step_overhead_s,
    }
    step = sum(terms.values())
    terms["expert_busy"] = expert_busy  # for reading only: already inside the pipeline's time
    state = max(coord_params, expert_params) * STATE_BYTES_PER_PARAM / 1e9
    return Prediction(f"disaggregated {c}c+{x}e mb={m}", step, shape.tokens_per_step / step, terms, state)


def gpu_machine(name: str, peak_flops: float, mfu: float, intra: Link, inter: Link, devices_per_node: int,
                hbm_bytes_per_s: float, optimizer_bytes_per_param: int = 32) -> Machine:
    """A GPU cluster: every kind of compute at ``mfu`` x ``peak_flops``; AdamW bound by memory
    bandwidth (``optimizer_bytes_per_param`` read and written per parameter, fp32 state)."""
    rate = peak_flops * mfu
    return Machine(name, rate, rate, rate, rate, optimizer_bytes_per_param / hbm_bytes_per_s, intra, inter,
                   devices_per_node)


def with_link(machine: Machine, bandwidth_scale: float = 1.0, latency_scale: float = 1.0) -> Machine:
    """The same machine with every link's bandwidth and latency scaled (for sensitivity checks)."""

    def scaled(link: Link) -> Link:
        return Link(link.bandwidth * bandwidth_scale, link.latency * latency_scale)

    return replace(machine, intra=scaled(machine.intra), inter=scaled(machine.inter))
