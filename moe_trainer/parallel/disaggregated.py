"""Disaggregated strategy: coordinators run everything but the experts; expert actors run only experts.

Ranks ``0 .. C-1`` are coordinators (data parallel among themselves: embeddings,
attention, norms, dense FFNs, routers, LM head); ranks ``C .. C+X-1`` are expert
actors holding ``E / X`` experts of every MoE layer. Any C and X (X divides E).

Rows travel point to point (:mod:`moe_trainer.parallel.p2p`): a coordinator sends each
expert actor a header and its rows, goes on (attention for the next micro-batch, the
next block of a micro-batch whose results landed), and collects the results when it
needs them. An expert actor serves messages in the order they arrive, reading phase,
key and counts from each header (:class:`Inbox`): it needs no copy of the coordinators'
schedule, only how many messages a step brings. In backward the same: the autograd
engine's order decides which gradients a coordinator sends first, and the expert actor
serves them as they come. Coordinators must send the same sequence (identical graphs):
an expert actor that sees two keys for one message stops the job.

The expert actor's optimizer step is the Trainer's (:class:`~moe_trainer.parallel.context.DistributedContext`
for the gradient average and global norm, :func:`~moe_trainer.train.optim.apply_update`).

Shape legend: D width, M rows received by an expert actor, L local experts, C coordinators.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
from torch import Tensor, nn

from moe_trainer.config.errors import CollectiveError
from moe_trainer.config.schema import Config
from moe_trainer.config.validate import micro_batches
from moe_trainer.hub.init_from import apply_init_from
from moe_trainer.model.transformer import init_weights, is_moe_block
from moe_trainer.moe.dispatcher import Dispatched, DispatchPlan, permute
from moe_trainer.moe.experts import SwiGLUExperts
from moe_trainer.parallel.context import DistributedContext, Groups
from moe_trainer.parallel.p2p import LandFromExperts, Lanes, Posted, SendToExperts, Trip, peer_slices
from moe_trainer.parallel.protocol import BACKWARD, EVAL, FORWARD, HEADER_PREFIX, PHASE_NAMES, Route
from moe_trainer.parallel.telemetry import CommCounters
from moe_trainer.timeline import is_sampled, timeline
from moe_trainer.timing import Elapsed, Span, mark
from moe_trainer.train.aggregate import TIMELINE_KEY
from moe_trainer.train.optim import apply_update, build_optimizer, optimizer_state_mb, set_lr
from moe_trainer.train.precision import compute_dtype
from moe_trainer.train.trainer import process_memory_mb, process_peak_memory_mb


@dataclass(frozen=True)
class Roles:
    """Rank layout of a disaggregated job."""

    num_coordinators: int
    num_expert_actors: int
    num_experts: int

    @property
    def world(self) -> int:
        return self.num_coordinators + self.num_expert_actors

    @property
    def experts_per_actor(self) -> int:
        return self.num_experts // self.num_expert_actors

    @property
    def coordinators(self) -> list[int]:
        return list(range(self.num_coordinators))

    @property
    def expert_actors(self) -> list[int]:
        return list(range(self.num_coordinators, self.world))

    def is_coordinator(self, rank: int) -> bool:
        return rank < self.num_coordinators

    def expert_range(self, rank: int) -> tuple[int, int]:
        """``(first global expert, count)`` held by ``rank`` (coordinators hold none)."""
        if self.is_coordinator(rank):
            return 0, 0
        return (rank - self.num_coordinators) * self.experts_per_actor, self.experts_per_actor


class ExpertShardModel(nn.Module):
    """Only the experts of every MoE block, named as in the full Transformer (``blocks.3.ffn.experts.*``).

    The names make initialisation and checkpoint entries identical to the
    single-process model's, expert for expert.
    """

    def __init__(self, cfg: Config, expert_range: tuple[int, int]) -> None:
        super().__init__()
        first, count = expert_range
        self.blocks = nn.ModuleDict({
            str(i): nn.ModuleDict({"ffn": nn.ModuleDict({"experts": SwiGLUExperts(
                count, cfg.model.d_model, cfg.moe.expert_hidden, first_expert=first)})})
            for i in range(cfg.model.n_layers) if is_moe_block(i, cfg.moe)
        })
        init_weights(self, cfg.train.seed, cfg.model)
        apply_init_from(self, cfg)
        for _, experts in self.named_layers():  # recompute=block reaches the experts wherever they live
            experts.recompute = cfg.train.recompute == "block"

    def named_layers(self) -> list[tuple[int, SwiGLUExperts]]:
        """``(block index, experts)`` of every MoE block, in depth order."""
        return [(int(i), block["ffn"]["experts"]) for i, block in self.blocks.items()]  # type: ignore[index]




class ExpertActorsTransport:
    """Coordinator side: sends each expert actor its rows (point to point) and lets the results land later.

    The micro-batch schedule (:func:`~moe_trainer.parallel.schedule.run_microbatches`) lands a
    micro-batch's results only when that micro-batch next needs its residual stream.
    """

    def __init__(self, roles: Roles, lanes: Lanes, counters: CommCounters | None = None) -> None:
        self.roles = roles
        self.lanes = lanes
        self.counters = counters if counters is not None else CommCounters()
        self.dispatches = 0  # the key of the next dispatch: every coordinator counts the same

    def order(self, plan: DispatchPlan) -> DispatchPlan:
        return plan  # by global expert: expert actors own consecutive experts, so by actor too

    def send(self, x_TD: Tensor, plan: DispatchPlan, layer: int) -> tuple[Tensor, Tensor, Any]:
        r = self.roles
        counts_XL = plan.tokens_per_expert_E.view(r.num_expert_actors, r.experts_per_actor)
        rows = counts_XL.sum(1).tolist()  # the split sizes: the one host read of a dispatch
        trip = Trip(r.expert_actors, rows, counts_XL, self.dispatches, layer, self.lanes, self.counters)
        self.dispatches += 1
        # a forward that will have a backward: anything else must not leave activations on the expert actors
        phase = FORWARD if torch.is_grad_enabled() and x_TD.requires_grad else EVAL
        reply_ND = SendToExperts.apply(permute(x_TD, plan.token_idx_N), trip, phase)
        assert isinstance(reply_ND, Tensor)
        return reply_ND, plan.tokens_per_expert_E[:0], trip

    def run_experts(self, experts: Any, dispatched: Dispatched) -> Tensor:
        """The experts run on the expert actors: their results are on the way."""
        return dispatched.x_ND

    def receive(self, y_ND: Tensor, dispatched: Dispatched) -> Tensor:
        assert isinstance(dispatched.comm, Trip)
        y_ND = LandFromExperts.apply(y_ND, dispatched.comm)
        assert isinstance(y_ND, Tensor)
        return y_ND


@dataclass
class Message:
    """One message from every coordinator: the same phase and key, each coordinator's rows."""

    phase: int
    key: int
    layer: int  # block index of the MoE layer
    route: Route  # rows per coordinator and their regrouping by local expert
    rows_MD: Tensor  # the coordinators' rows, in coordinator order


@dataclass
class _Incoming:
    """The next message while it arrives: its headers, then its rows."""

    headers_CH: Tensor
    headers: Posted
    rows_MD: Tensor | None = None
    rows: Posted = field(default_factory=Posted)
    host: list[list[int]] | None = None  # the headers, read
    splits: list[int] = field(default_factory=list)  # rows from each coordinator, from the headers


class Inbox:
    """Receives messages from every coordinator in the order they were sent, the next one ahead.

    The next header's receive is posted as soon as the current rows' receive is, so a
    coordinator's sends complete while this actor computes (gloo sends wait for the
    receive); :meth:`prefetch` posts the next rows' receive once their header is in.
    Every coordinator must send the same phase and key: a coordinator whose graph differs
    stops the job here, instead of leaving ranks waiting for messages that never come.
    """

    def __init__(self, server: ExpertServer, messages: int) -> None:
        self.server = server
        self.left = messages  # messages not yet posted
        self.upcoming: _Incoming | None = None

    def _post_headers(self) -> _Incoming | None:
        if self.left == 0:
            return None
        self.left -= 1
        s = self.server
        headers_CH = torch.empty(s.roles.num_coordinators, HEADER_PREFIX + s.roles.experts_per_actor,
                                 dtype=torch.int64, device=s.device)
        posted = Posted()
        for c, coordinator in enumerate(s.roles.coordinators):
            posted.recv(headers_CH[c], coordinator, s.lanes.requests, "receive of a header from a coordinator")
        return _Incoming(headers_CH, posted)

    def _post_rows(self, incoming: _Incoming) -> None:
        incoming.headers.wait()
        incoming.host = incoming.headers_CH.tolist()  # phase, key and split sizes: one host read
        s = self.server
        incoming.splits = [sum(h[HEADER_PREFIX:]) for h in incoming.host]
        incoming.rows_MD = torch.empty(sum(incoming.splits), s.d_model, dtype=s.payload_dtype, device=s.device)
        for coordinator, part in peer_slices(incoming.rows_MD, s.roles.coordinators, incoming.splits):
            incoming.rows.recv(part, coordinator, s.lanes.requests, "receive of rows from a coordinator")

    def next(self) -> Message:
        """The next message, waited for (the wait is this actor's idle time: a timeline ``wait`` region)."""
        device = self.server.device
        t0 = mark(device)
        incoming = self.upcoming or self._post_headers()
        assert incoming is not None, "more messages asked for than the step brings"
        if incoming.host is None:
            self._post_rows(incoming)
        self.upcoming = self._post_headers()  # after the rows' receive: the order the coordinators send in
        incoming.rows.wait()
        msg = self._message(incoming)
        timeline.span(f"wait for {PHASE_NAMES[msg.phase]} rows", "wait", Span.since(t0, device),
                      {"dispatch": msg.key, "block": msg.layer, "rows": msg.rows_MD.shape[0]})
        return msg

    def prefetch(self) -> None:
        """Posts the next message's rows receive if its headers are already in (never waits)."""
        incoming = self.upcoming
        if incoming is not None and incoming.host is None and incoming.headers.done():
            self._post_rows(incoming)

    def _message(self, incoming: _Incoming) -> Message:
        assert incoming.host is not None and incoming.rows_MD is not None
        first = incoming.host[0][:HEADER_PREFIX]
        for c, h in enumerate(incoming.host):
            if h[:HEADER_PREFIX] != first:
                refuse(f"rank {self.server.rank}: coordinators disagree on the dispatch schedule: coordinator 0 sent "
                       f"{_describe(first)}, coordinator {c} sent {_describe(h)} as the same message; their autograd "
                       "graphs must be identical (same model and parallel.micro_batches on every coordinator)")
        phase, key, layer = first
        counts_CL = incoming.headers_CH[:, HEADER_PREFIX:]
        route = Route.received(incoming.splits, incoming.splits, counts_CL)  # replies go back the way rows came
        return Message(phase, key, layer, route, incoming.rows_MD)


def refuse(message: str) -> NoReturn:
    """Stops on a message that breaks the protocol.

    The coordinators wait for replies that will not come: the actor group re-raises this error
    within its grace period and ends them (``actors/group.py``), long before ``parallel.timeout_s``.
    """
    raise CollectiveError(message)


def _describe(h: list[int]) -> str:
    """A header's ``(phase, key, MoE block)`` in words."""
    return f"{PHASE_NAMES.get(h[0], f'phase {h[0]}')} of dispatch {h[1]} (MoE block {h[2]})"


@dataclass
class _Served:
    """One dispatch served in a training forward, kept for its backward."""

    route: Route
    x_MD: Tensor  # leaf: the rows received, in local-expert order
    y_MD: Tensor  # the experts' output for them


@dataclass
class _StepClock:
    busy: Elapsed = field(default_factory=Elapsed)  # computing experts and the update (resolved at the step's end)
    rows: int = 0  # rows received from coordinators


class ExpertServer:
    """Runs an expert actor: serves the coordinators' messages, then the optimizer step every rank takes.

    Has the attributes a checkpoint needs (``model``, ``optimizer``, ``step``,
    ``tokens_seen``, ``ctx.device``) so :mod:`moe_trainer.train.sharded_checkpoint`
    saves and loads it like a Trainer.
    """

    def __init__(self, cfg: Config, rank: int, roles: Roles, device: torch.device, group: Any, lanes: Lanes) -> None:
        self.cfg, self.rank, self.roles, self.device = cfg, rank, roles, device
        self.model = ExpertShardModel(cfg, roles.expert_range(rank)).to(device)
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.group = group
        self.lanes = lanes  # point-to-point traffic, one process group per direction (see parallel/p2p.py)
        # the coordinators' loss is a mean over their own rows: expert gradients are averaged over them, and the
        # global norm adds every shard's squares in one all-reduce over the world (the coordinators' norm group)
        groups = Groups(data=None, expert_replicas=None, replicas=1, norm=group, counts_dense_norm=False)
        self.ctx = DistributedContext(rank - roles.num_coordinators, roles.num_coordinators, groups, CommCounters(),
                                      device)
        self.step = 0
        self.tokens_seen = 0
        self.layers = dict(self.model.named_layers())
        # one message per MoE layer, micro-batch and accumulation pass of the coordinators' forward
        self.messages_per_pass = len(self.layers) * micro_batches(cfg)
        self.accum_steps = cfg.train.grad_accum_steps
        self.d_model = cfg.model.d_model
        # the coordinators send rows (and gradients) in the compute dtype: receive buffers must match
        self.payload_dtype = compute_dtype(cfg.train.precision)

    def _serve(self, messages: int, phases: tuple[int, ...], clock: _StepClock) -> None:
        """Serves ``messages`` messages of the given phases, in arrival order; returns once every reply is sent."""
        inbox, outbox = Inbox(self, messages), Posted()
        served: dict[int, _Served] = {}
        for _ in range(messages):
            msg = inbox.next()
            if msg.phase not in phases:
                refuse(f"rank {self.rank}: a coordinator sent a {_describe([msg.phase, msg.key, msg.layer])} where "
                       f"this expert actor expected {' or '.join(PHASE_NAMES[p] for p in phases)}")
            inbox.prefetch()
            t0 = mark(self.device)
            if msg.phase == BACKWARD:
                item = served.pop(msg.key, None)
                if item is None:
                    refuse(f"rank {self.rank}: a coordinator sent the backward of dispatch {msg.key} (MoE block "
                           f"{msg.layer}), whose forward this expert actor did not serve in this step")
                item.y_MD.backward(item.route.to_experts(msg.rows_MD))
                grad_MD = item.x_MD.grad if item.x_MD.grad is not None else torch.zeros_like(item.x_MD)
                reply = item.route.to_peers(grad_MD)
            else:
                experts = self._experts(msg.layer)
                train = msg.phase == FORWARD
                x_MD = msg.route.to_experts(msg.rows_MD).requires_grad_(train)
                clock.rows += x_MD.shape[0]
                with torch.set_grad_enabled(train):
                    y_MD = experts(x_MD, msg.route.counts_L)
                if train:
                    served[msg.key] = _Served(msg.route, x_MD, y_MD)
                reply = msg.route.to_peers(y_MD.detach())
            span = Span.since(t0, self.device)
            clock.busy.add(span)
            timeline.span(f"experts {PHASE_NAMES[msg.phase]}", "compute", span,
                          {"dispatch": msg.key, "block": msg.layer, "rows": msg.rows_MD.shape[0]})
            outbox.reap()  # replies the coordinators already took: their tensors can go now, not at the step's end
            for coordinator, part in peer_slices(reply, self.roles.coordinators, msg.route.recv_splits):
                outbox.send(part, coordinator, self.lanes.replies,
                            f"send of {PHASE_NAMES[msg.phase]} replies to coordinator {coordinator}")
        outbox.wait()
        assert not served, f"dispatches {sorted(served)} got no backward"

    def _experts(self, layer: int) -> SwiGLUExperts:
        experts = self.layers.get(layer)
        if experts is None:
            refuse(f"rank {self.rank}: a coordinator sent rows for block {layer}, which has no MoE layer here "
                   f"(MoE blocks: {sorted(self.layers)}); every rank builds the same model")
        return experts

    def train_step(self) -> dict[str, Any]:
        """One optimizer step: serve the step's forward and backward messages, then update as the Trainer does."""
        clock = _StepClock()
        t_start = mark(self.device)
        timeline.begin_step(self.step + 1, self.rank, "experts", self.device,
                            is_sampled(self.step + 1, self.cfg.logger.timeline_every))
        lr = set_lr(self.optimizer, self.step, self.cfg.train)
        self.optimizer.zero_grad(set_to_none=True)
        # every pass: one forward message per MoE layer and micro-batch, and one backward message for each
        self._serve(2 * self.messages_per_pass * self.accum_steps, (FORWARD, BACKWARD), clock)
        with timeline.region("grad sync", "sync", self.device):
            self.ctx.sync_gradients(self.model)
        with timeline.region("grad norm", "sync", self.device):  # mostly waiting for the coordinators' backward
            grad_norm = self.ctx.grad_norm(self.model)
        t0 = mark(self.device)
        with timeline.region("optimizer", "optimizer", self.device):
            finite = apply_update(self.optimizer, grad_norm, self.cfg.train.grad_clip)
        clock.busy.add(Span.since(t0, self.device))  # busy: computing experts and the update, not all-reduces
        self.step += 1
        total = Span.since(t_start, self.device).seconds()  # the step's one wait for its timings
        events = timeline.end_step()
        busy = clock.busy.take()
        # step_skipped: the chunk loop (nan_guard.run_steps) must stop this rank where it stops the coordinators
        return {"step": self.step, "lr": lr, "step_skipped": not finite, "expert_busy_s": busy,
                "expert_wait_s": total - busy, "expert_step_time_s": total, "expert_rows_recv": clock.rows,
                "expert_mem_rss_mb": process_memory_mb(), "expert_mem_peak_rss_mb": process_peak_memory_mb(),
                "expert_mem_optim_state_mb": self._optimizer_state_mb(),
                **({TIMELINE_KEY: events} if events is not None else {})}

    def _optimizer_state_mb(self) -> float:
        """This actor's AdamW state (its experts' moments; never sharded: no other rank holds them)."""
        return optimizer_state_mb(self.optimizer, {})[0]

    def evaluate(self, batches: int) -> None:
        """Serves the coordinators' evaluation forwards (the forwards of a training step, per batch)."""
        with torch.no_grad():
            self._serve(batches * self.messages_per_pass * self.accum_steps, (EVAL,), _StepClock())
