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

from actors.cluster import Request, dead_nodes
from actors.worker import TrainWorker
from moe_trainer.config.schema import Config
from moe_trainer.engine import EngineLost, EngineStartError
from moe_trainer.parallel.placement import rank_bundles

# After one rank's call fails, how long to watch the others for a dead actor before reporting
# the failure itself (their collectives fail within seconds when a peer is gone).
FAILURE_GRACE_S = 10.0
POLL_S = 0.5  # how often a wait for the ranks returns to Python (signal handlers run only then)


def _bundle(cpus: float, gpus: float) -> dict[str, float]:
    """One rank's placement-group bundle (a GPU entry only when it asks for one)."""
    return {"CPU": cpus, **({"GPU": gpus} if gpus else {})}


class ActorLost(EngineLost):
    """An actor of the group died; the group must be rebuilt."""


class NodeLost(ActorLost):
    """A node running some of the ranks is gone (its processes killed, the machine lost)."""

    def __init__(self, message: str, nodes: set[str], ranks: list[int]) -> None:
        super().__init__(message)
        self.nodes, self.ranks = nodes, ranks


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

        A dead actor raises :class:`ActorLost` as soon as Ray reports it, and so does a failed
        call whose rank's node turns out gone (:func:`actors.cluster.dead_nodes`: a killed
        machine's raylet refuses connections within a second, before Ray's health checks
        mark it dead). Any other failed call (a collective that timed out, a rank that could not
        join) is re-raised after the other ranks finish or ``FAILURE_GRACE_S`` passes, unless one
        of them turns out dead. The wait wakes every ``POLL_S`` so the driver's signal handlers
        (preemption) run while a chunk is in flight.
        """
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        pending, failure, deadline = list(refs), None, None
        while pending:
            wait_s = POLL_S if deadline is None else max(0.0, min(POLL_S, deadline - time.monotonic()))
            done, pending = ray.wait(pending, num_returns=1, timeout=wait_s)
            if not done:
                if deadline is not None:
                    self._raise_if_nodes_lost(method)
                    if time.monotonic() >= deadline:  # the others are still blocked (in a collective with it)
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
        """Raises :class:`NodeLost` when a node running some of the ranks is gone."""
        if not self.infos:
            return
        gone = dead_nodes({info["node"] for info in self.infos})
        if gone:
            ranks = [info["rank"] for info in self.infos if info["node"] in gone]
            raise NodeLost(f"node {', '.join(sorted(gone))} was lost during {method} (ranks "
                           f"{', '.join(map(str, ranks))})", gone, ranks)

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
    """The node address each bundle of a ready placement group was placed on."""
    addresses = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placed = ray.util.placement_group_table(pg)["bundles_to_node_id"]
    return [addresses.get(placed[b], "?") for b in sorted(placed)]
