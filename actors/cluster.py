"""Connecting the driver to Ray, and checking the cluster can hold the job before any actor starts.

Default: a fresh embedded Ray bound to 127.0.0.1 (``address="local"``), never the
cluster named in ``/tmp/ray/ray_current_cluster``, which may be a dead head left
behind. An existing cluster is explicit: ``cluster.address`` or ``RAY_ADDRESS``.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from dataclasses import dataclass

import ray

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import ClusterConfig
from moe_trainer.parallel.resources import RoleResources
from moe_trainer.startup import phase


def _reachable(address: str, timeout_s: float) -> bool:
    """TCP check of a ``host:port`` address, so a dead address fails in seconds, not after Ray's retries."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # "auto", "ray://..." and other forms: let Ray decide
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False


EMBEDDED = "embedded local Ray (127.0.0.1)"
_connected_here = False  # this process called ray.init (and so owns the connection)
_described = ""  # what connect() returned for the connection this process owns
_address: str | None = None  # the address it was made for ("" = embedded)


def connect(cfg: ClusterConfig) -> str:
    """Connects, or reuses this process's connection to the same address (the jobs of a Hydra
    multirun share one embedded Ray); returns a description of the cluster."""
    global _connected_here, _described, _address
    address = cfg.address or os.environ.get("RAY_ADDRESS") or ""
    if ray.is_initialized():
        if not _connected_here:
            return "existing connection"
        if address == _address:
            return _described
        disconnect()  # this process's own connection, to another cluster
    _connected_here, _address = True, address  # set first: a failed ray.init is cleaned up by disconnect()
    t0 = time.perf_counter()
    _quiet_console()
    _described = _connect(cfg, address)
    phase(f"connected to Ray ({time.perf_counter() - t0:.1f} s)")
    return _described


def _quiet_console() -> None:
    """Ray's console habits that help nobody here, changed without changing what Ray does.

    ``RAY_COLOR_PREFIX=0``: Ray wraps each forwarded actor line's ``(TrainWorker pid=...)``
    prefix in colour codes even when the console is a file; keep them only on a terminal.
    """
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def _connect(cfg: ClusterConfig, address: str) -> str:
    if not address:
        phase("connecting to Ray (embedded, 127.0.0.1)")
        ray.init(address="local", _node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=True,
                 configure_logging=False)
        return EMBEDDED
    setting = "cluster.address" if cfg.address else "RAY_ADDRESS"
    if address.startswith(("http://", "https://")):
        raise ConfigError(setting, address, "is a Ray Jobs (dashboard) address; moe-train connects to the cluster "
                          "itself: give HOST:6379 (the head's GCS port), or unset it for an embedded local Ray. "
                          "To submit a job to that address use moe-submit.")
    if not _reachable(address.removeprefix("ray://"), cfg.connect_timeout_s):
        raise ConfigError(setting, address, f"no Ray cluster answers there within {cfg.connect_timeout_s:.0f} s; "
                          "check the address (HOST:6379 of the head) or unset it to use an embedded local Ray")
    phase(f"connecting to Ray at {address}")
    try:
        ray.init(address=address, log_to_driver=True, configure_logging=False)
    except Exception as err:  # Ray raises several types (ConnectionError, RuntimeError, auth errors)
        hint = ""
        if "auth" in str(err).lower() or "token" in str(err).lower():
            hint = (" The cluster uses token authentication: set RAY_AUTH_MODE=token and put the token in "
                    "~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN.")
        raise ConfigError(setting, address, f"could not connect to Ray: {str(err).splitlines()[0]}.{hint}") from err
    return address


def disconnect() -> None:
    """Ends the connection :func:`connect` opened: stops an embedded Ray (flushing actor logs), or
    detaches from a cluster (which keeps running). A connection made by someone else is left alone."""
    global _connected_here, _address
    if _connected_here and ray.is_initialized():
        ray.shutdown()
    _connected_here, _address = False, None


@dataclass(frozen=True)
class Request:
    """The actors a job asks Ray for, role by role in rank order (see :mod:`moe_trainer.parallel.resources`)."""

    roles: tuple[RoleResources, ...]

    @property
    def actors(self) -> int:
        return sum(role.actors for role in self.roles)

    def per_rank(self) -> list[tuple[float, float]]:
        """``(cpus, gpus)`` of each rank: one placement-group bundle each."""
        return [(role.cpus, role.gpus) for role in self.roles for _ in range(role.actors)]

    def total(self, resource: str) -> float:
        """CPUs (``"CPU"``) or GPUs (``"GPU"``) of the whole job."""
        return sum(role.actors * role.reserves(resource)[0] for role in self.roles)


def _asked(request: Request, resource: str) -> str:
    """``"1 coordinator x 1 CPUs (parallel.cpus_per_coordinator) + ... = 2 CPUs requested"``: each
    role's share, named by the setting it came from when roles differ."""
    def share(role: RoleResources) -> str:
        each, setting = role.reserves(resource)
        named = f" ({setting})" if len(request.roles) > 1 else ""
        return f"{role.count()} x {each:g} {resource}s{named}"

    return " + ".join(map(share, request.roles)) + f" = {request.total(resource):g} {resource}s requested"


def is_embedded() -> bool:
    """Whether this process's connection is the embedded local Ray it started (which never grows)."""
    return _connected_here and _address == ""


def alive_nodes() -> dict[str, dict[str, float]]:
    """The cluster's alive nodes by node id, each with its total CPUs and GPUs (``{"CPU": 2.0, "GPU": 0.0}``)."""
    return {n["NodeID"]: {"CPU": n["Resources"].get("CPU", 0.0), "GPU": n["Resources"].get("GPU", 0.0)}
            for n in ray.nodes() if n["Alive"]}


def node_addresses() -> dict[str, str]:
    """Every node id Ray knows (alive or dead) and its address, for messages."""
    return {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}


def suspect_nodes(node_ids: set[str]) -> tuple[set[str], set[str]]:
    """``(dead, refusing)``: nodes Ray counts dead, and nodes Ray still counts alive whose raylet refuses
    connections, which is what a machine whose processes died looks like in the first seconds, before
    Ray's health checks decide (a raylet that is silent, not refusing, is left to Ray). Keyed by node id:
    a node restarted on the same address is a new node, and the old one stays listed as dead.
    """
    known = {n["NodeID"]: n for n in ray.nodes()}
    dead, refusing = set(), set()
    for node_id in node_ids:
        node = known.get(node_id)
        if node is None or not node["Alive"]:
            dead.add(node_id)
            continue
        try:
            with socket.create_connection((node["NodeManagerAddress"], int(node["NodeManagerPort"])), timeout=1.0):
                pass
        except ConnectionRefusedError:
            refusing.add(node_id)
        except OSError:
            pass
    return dead, refusing


def wait_until_marked_dead(node_ids: set[str], timeout_s: float) -> set[str]:
    """Waits until Ray itself counts these nodes dead (so new placements avoid them); returns those it does."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = set(alive_nodes())
        if not node_ids & alive or time.monotonic() >= deadline:
            return node_ids - alive
        time.sleep(0.2)


def _lacking(request: Request) -> tuple[str, float] | None:
    """The first resource (GPU, then CPU) the cluster's totals fall short of for ``request``, and how much of
    it the cluster has; None when its totals hold the request."""
    total = ray.cluster_resources()
    for resource in ("GPU", "CPU"):
        if request.total(resource) > total.get(resource, 0.0):
            return resource, total.get(resource, 0.0)
    return None


def _shortfall(request: Request) -> str | None:
    """What the cluster lacks for ``request`` now (a message), or None when its totals hold it."""
    lacking = _lacking(request)
    return None if lacking is None else f"{_asked(request, lacking[0])}, the Ray cluster has {lacking[1]:g}"


def wait_for_resources(request: Request, wait_s: float) -> bool:
    """Waits up to ``wait_s`` for the cluster's totals to hold ``request``; True when they do.

    An autoscaling cluster is told what is missing (``ray.autoscaler.sdk.request_resources``,
    the bundles of the job), so it starts nodes instead of waiting for a pending placement. The request
    is cleared afterwards (``request_resources`` holds one request per cluster, not per job).
    """
    if _shortfall(request) is None:
        return True
    if wait_s <= 0:
        return False
    from ray.autoscaler.sdk import request_resources

    bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})} for cpus, gpus in request.per_rank()]
    phase(f"waiting up to {wait_s:g} s (cluster.wait_for_resources_s) for the cluster to grow: {_shortfall(request)}")
    deadline = time.monotonic() + wait_s
    try:
        request_resources(bundles=bundles)
        while time.monotonic() < deadline:
            if _shortfall(request) is None:
                return True
            time.sleep(0.5)
        return _shortfall(request) is None
    finally:
        request_resources(bundles=[])  # the job's placement group now speaks for itself


def check_resources(request: Request, wait_s: float = 0.0) -> None:
    """Refuses a job the cluster cannot place, saying what was asked and what exists.

    ``wait_s`` (``cluster.wait_for_resources_s``, an existing cluster only): first wait that long
    for the cluster to grow. A job of one role is refused by its actor count
    (``parallel.num_actors``); a job of several roles (disaggregated) by the per-actor setting of
    the role that asks for the most, naming every count and size setting the user can trade.
    """
    lacking = None if wait_for_resources(request, wait_s) else _lacking(request)
    if lacking is None:
        return
    resource, have = lacking
    waited = (f" (after waiting {wait_s:g} s, cluster.wait_for_resources_s)" if wait_s > 0 else
              "" if is_embedded() else "; an autoscaling cluster: set cluster.wait_for_resources_s to wait for it")
    sizes = list(dict.fromkeys(role.reserves(resource)[1] for role in request.roles))
    largest = max(request.roles, key=lambda role: role.actors * role.reserves(resource)[0])
    each, setting = largest.reserves(resource)
    asked = f"{_asked(request, resource)}, the Ray cluster has {have:g}{waited}"
    if resource == "GPU":
        raise ConfigError(setting, each, f"{asked}; use {' and '.join(f'{s}=0' for s in sizes)} for CPU (gloo)")
    if len(request.roles) == 1:
        raise ConfigError(largest.count_setting, largest.actors, f"{asked}; use fewer actors or lower {setting}")
    counts = ", ".join(role.count_setting for role in request.roles)
    raise ConfigError(setting, each, f"{asked}; use fewer actors ({counts}) or lower {' / '.join(sizes)}")
