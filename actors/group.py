"""The actor group: placement, creation, rendezvous and shutdown of a strategy's Ray actors.

Actors are created in one placement group (so they start together or not at all),
rank 0 picks the rendezvous address, and every actor joins one DeepSpeed process
group. The group is the only place that knows actors exist; everything above it
sees an :class:`moe_trainer.engine.Engine`.
"""

from __future__ import annotations

import time
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.cluster import Request, node_addresses, suspect_nodes
from actors.worker import TrainWorker
from moe_trainer.config.schema import Config
from moe_trainer.engine import EngineLost, EngineStartError
from moe_trainer.parallel.placement import rank_bundles

# After one rank's call fails, how long to watch the others for a dead actor before reporting
# the failure itself (their collectives fail within seconds when a peer is gone).
FAILURE_GRACE_S = 10.0
POLL_S = 0.5  # how often a wait for the ranks returns to Python (signal handlers run only then)
PROBE_S = 2.0  # how often the nodes of running ranks are checked (one ray.nodes() call)
PING_S = 2.0  # how long the ranks of a node whose raylet refuses connections have to answer a ping


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One rank's placement-group bundle (a GPU entry only when it asks for one)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


class ActorLost(EngineLost):
    """An actor of the group died; the group must be rebuilt."""


class NodeLost(ActorLost):
    """A node running some of the ranks is gone (its processes killed, the machine lost).

    ``node_ids``: Ray's ids of the lost nodes; ``nodes``: their addresses, for messages and records.
    """

    def __init__(self, message: str, node_ids: set[str], nodes: set[str], ranks: list[int]) -> None:
        super().__init__(message)
        self.node_ids, self.nodes, self.ranks = node_ids, nodes, ranks


class ActorStartupError(EngineStartError):
    """The actors could not be placed or could not form their process group in time."""


class ActorGroup:
    """``actors``: running TrainWorkers to reuse instead of creating (and placing) new ones.

    A reused actor leaves its previous process group and joins this one; shutdown then
    leaves the group and keeps the actor. Starting a Ray worker and importing torch and
    DeepSpeed costs seconds per actor, which a series of short jobs of the same size (the
    equivalence tests) pays once this way.
    """

    def __init__(self, cfg: Config, request: Request, actor_cls: Any = TrainWorker,
                 actors: list[Any] | None = None) -> None:
        self.cfg = cfg
        timeout = cfg.parallel.timeout_s
        self.pg: Any = None
        self.closed = False
        self.reused = actors is not None
        if actors is not None:
            if len(actors) != request.actors:
                raise ValueError(f"{len(actors)} actors given for a group of {request.actors}")
            self.actors = list(actors)
            try:
                ray.get([actor.reuse.remote(cfg, i) for i, actor in enumerate(self.actors)], timeout=timeout)
            except ray.exceptions.RayTaskError as err:  # refused: a setting the process cannot change
                self.shutdown()  # every one leaves, whichever took the new config
                raise err.as_instanceof_cause() from None
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as err:
                self._kill()  # dead or stuck: some may hold the new config, some the old; none is fit for reuse
                raise ActorStartupError(f"the actors to reuse did not take the new job: {err}") from err
        else:
            self.actors = self._create(cfg, request, actor_cls)
        self.infos: list[dict[str, Any]] = []
        t0 = time.perf_counter()
        try:
            addr, port = ray.get(self.actors[0].rendezvous_address.remote(), timeout=timeout)
            self.infos = self.call("join", addr, port)
        except Exception as err:  # a rank that cannot join leaves the others waiting: stop them all
            self.shutdown()
            raise ActorStartupError(f"the actors could not form their process group: {err}") from err
        self.join_time_s = time.perf_counter() - t0

    def _create(self, cfg: Config, request: Request, actor_cls: Any) -> list[Any]:
        """New actors, one per bundle of one placement group (they start together or not at all).

        Bundle ``i`` holds rank ``i``'s own resources (disaggregated roles are sized apart), and
        the actor asks for exactly its bundle, so Ray's reservation is what the rank computes with.
        """
        self.pg = placement_group([_bundle(cpus, gpus) for cpus, gpus in request.per_rank()],
                                  strategy=cfg.parallel.placement.upper())
        timeout = cfg.parallel.timeout_s
        try:
            ray.get(self.pg.ready(), timeout=timeout)
        except ray.exceptions.GetTimeoutError as err:
            remove_placement_group(self.pg)
            asked = " + ".join(f"{role.count()} x {_bundle(role.cpus, role.gpus)}" for role in request.roles)
            raise ActorStartupError(
                f"could not place {asked} within {timeout:.0f} s; "
                f"cluster has {ray.available_resources()} available") from err
        # which bundle each rank runs in: expert-parallel groups inside a node when one holds them
        bundles = rank_bundles(cfg, _bundle_nodes(self.pg))
        return [
            actor_cls.options(
                num_cpus=cpus,
                num_gpus=gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=bundles[i]),
            ).remote(cfg, i)
            for i, (cpus, gpus) in enumerate(request.per_rank())
        ]

    def call(self, method: str, *args: Any) -> list[Any]:
        """Calls ``method`` on every actor at once and waits for all results (collectives need all ranks).

        A dead actor raises :class:`ActorLost` as soon as Ray reports it, and a lost node
        :class:`NodeLost` as soon as it is seen (:meth:`_raise_if_nodes_lost`: checked when a rank
        fails, and every ``PROBE_S`` while the ranks run, since with NCCL the survivors of a lost
        peer may block instead of failing). Any other failed call (a collective that timed out, a
        rank that could not join) is re-raised after the other ranks finish or
        ``FAILURE_GRACE_S`` passes, unless one of them turns out dead. The wait wakes every
        ``POLL_S`` so the driver's signal handlers (preemption) run while a chunk is in flight.
        """
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        pending, failure, deadline = list(refs), None, None
        next_probe = time.monotonic() + PROBE_S
        while pending:
            wait_s = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                if deadline is not None or time.monotonic() >= next_probe:
                    self._raise_if_nodes_lost(method)
                    next_probe = time.monotonic() + PROBE_S
                if deadline is not None and time.monotonic() >= deadline:  # the others are still blocked
                    break
                continue
            try:
                ray.get(done[0])
            except ray.exceptions.RayActorError as err:
                rank = refs.index(done[0])
                self._raise_if_nodes_lost(method)
                raise ActorLost(f"actor rank {rank} ({self._where(rank)}) died during {method}: "
                                f"{str(err).splitlines()[0]}") from err
            except ray.exceptions.RayTaskError as err:
                if failure is None:
                    failure, deadline = err, time.monotonic() + FAILURE_GRACE_S
                    self._raise_if_nodes_lost(method)
        if failure is not None:
            self._raise_if_nodes_lost(method)
            raise failure.as_instanceof_cause()
        return ray.get(refs)

    def _where(self, rank: int) -> str:
        info = self.infos[rank] if self.infos else {}
        return f"pid {info.get('pid', '?')} on {info.get('node', '?')}"

    def _raise_if_nodes_lost(self, method: str) -> None:
        """Raises :class:`NodeLost` when a node running some of the ranks is gone.

        Gone: Ray counts it dead, or its raylet refuses connections and none of its ranks answers a
        ping within ``PING_S`` (the ping runs in the actors' control thread, so a live rank answers
        even in the middle of a chunk; a firewall that rejects the probe does not make a node lost).
        """
        if not self.infos:
            return
        dead, refusing = suspect_nodes({info["node_id"] for info in self.infos})
        for node_id in refusing:
            on_node = [self.actors[i] for i, info in enumerate(self.infos) if info["node_id"] == node_id]
            answered, _ = ray.wait([actor.ping.remote() for actor in on_node], num_returns=1, timeout=PING_S)
            try:
                if answered and ray.get(answered[0]):
                    continue
            except ray.exceptions.RayError:
                pass
            dead.add(node_id)
        if dead:
            addresses = node_addresses()
            ranks = [info["rank"] for info in self.infos if info["node_id"] in dead]
            names = sorted(addresses.get(node_id, node_id) for node_id in dead)
            raise NodeLost(f"node {', '.join(names)} was lost during {method} (ranks {', '.join(map(str, ranks))})",
                           dead, set(names), ranks)

    def shutdown(self) -> None:
        """Stops the actors; reused ones leave the process group and stay (killed if they cannot). Once."""
        if self.closed:
            return
        self.closed = True
        if self.reused:
            try:
                ray.get([actor.leave.remote() for actor in self.actors], timeout=FAILURE_GRACE_S)
                return
            except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError):
                pass  # stuck in a collective or dead: end them, whoever lent them gets errors, not a hang
        self._kill()

    def _kill(self) -> None:
        """Ends every actor of the group (and frees its placement group, if it made one)."""
        self.closed = True
        if not ray.is_initialized():  # the connection is gone, and the actors with it (never reconnect to kill)
            return
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)
            self.pg = None


def _bundle_nodes(pg: Any) -> list[str]:
    """The node (Ray's node id) each bundle of a ready placement group was placed on."""
    placed = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [placed[b] for b in sorted(placed)]
