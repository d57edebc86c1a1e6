"""Real Ray nodes for tests, started as a user starts them: ``ray start`` in its own session.

Each node is one ``ray start --block`` process started with ``start_new_session``, so the
node's processes (raylet, GCS on the head, dashboard, agents, and the workers, which the
raylet puts in process groups of their own) share its session: ``SIGKILL`` to every process
of the session is the loss of a machine, and stopping the node touches nothing else. Every
address is on loopback (127.0.0.0/8) and every port is chosen free, since other Ray clusters
run on this machine; token authentication stays on, with the token passed in the node's
environment (``RAY_AUTH_TOKEN``, as KubeRay does).

Ray rewrites 127.0.0.1 (and only it) to the machine's routable address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, which in turn refuses a second node; a cluster of
several nodes therefore puts its head on another loopback address (127.0.0.3).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 120.0


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` ports free on ``host`` now (all held open together, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without Ray or W&B settings (a user's shell), plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update(extra)
    return env


@dataclass
class RayNode:
    """One running ``ray start`` node: its address, the process group that is the node, its log."""

    ip: str
    cpus: int
    token: str
    temp: Path  # --temp-dir: its sockets, logs and session files
    proc: subprocess.Popen[bytes] | None = None
    gcs: str = ""  # head: "IP:PORT" of its GCS; a worker node: the head's it joined
    url: str = ""  # head: its Ray Jobs (dashboard) address
    home: Path = field(default_factory=Path)  # head: a HOME whose .ray/auth_token holds the token

    @property
    def log(self) -> Path:
        return self.temp / "node.log"

    def alive(self) -> list[int]:
        """Live processes of the node's session (zombies, reaped later by init, do not count)."""
        if self.proc is None:
            return []
        sid, pids = self.proc.pid, []
        for p in psutil.process_iter(["pid", "status"]):
            try:
                if os.getsid(p.info["pid"]) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                    pids.append(p.info["pid"])
            except (ProcessLookupError, PermissionError, psutil.Error):
                continue
        return pids

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM to ``ray start`` (which stops what it started), SIGKILL to what is left after ``grace_s``."""
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.1)
        if self.alive():
            self.kill()
        self.proc = None

    def kill(self) -> float:
        """The loss of the machine: SIGKILL to every process of the node at once; returns when (``time.time()``)."""
        at = time.time()
        for _ in range(3):  # a process started while the first pass ran is caught by the next
            for pid in self.alive():
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and self.alive():
            time.sleep(0.05)
        if self.proc is not None:
            self.proc.poll()  # reap the leader
        self.proc = None
        return at

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.poll()  # reap the leader


def _common_args(node: RayNode) -> list[str]:
    agent_grpc, agent_http, metrics, runtime_env, node_manager, object_manager = free_ports(6, node.ip)
    return [f"--node-ip-address={node.ip}", f"--num-cpus={node.cpus}", f"--temp-dir={node.temp}",
            f"--dashboard-agent-grpc-port={agent_grpc}", f"--dashboard-agent-listen-port={agent_http}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
            "--disable-usage-stats", "--block"]


def _launch(node: RayNode, args: list[str], env: dict[str, str]) -> None:
    with node.log.open("a") as out:
        node.proc = subprocess.Popen([str(BIN / "ray"), "start", *args], stdout=out, stderr=subprocess.STDOUT,
                                     env=env, cwd=node.temp, start_new_session=True)


def _node_env(node: RayNode, single: bool) -> dict[str, str]:
    env = clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=node.token, WANDB_MODE="offline")
    if single:  # a one-node cluster on 127.0.0.1 itself (see the module docstring)
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    return env


def start_head(ip: str, cpus: int, token: str, single: bool = False) -> RayNode:
    """A head node (GCS, Ray Jobs server) on ``ip``; returns once its job server answers with token auth."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix sockets live under it
    node = RayNode(ip=ip, cpus=cpus, token=token, temp=temp, home=temp / "home")
    (node.home / ".ray").mkdir(parents=True)
    (node.home / ".ray" / "auth_token").write_text(token)
    gcs, dashboard, client = free_ports(3, ip)
    node.gcs, node.url = f"{ip}:{gcs}", f"http://{ip}:{dashboard}"
    env = _node_env(node, single)
    # Ray's health checks of the nodes, tightened from 3 s x 5 misses so a lost node is marked dead in ~3 s
    # (docs/running-at-scale.md, "A lost node"): a restart waits for that verdict before placing new actors
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    _launch(node, ["--head", f"--port={gcs}", f"--dashboard-host={ip}", f"--dashboard-port={dashboard}",
                   f"--ray-client-server-port={client}", *_common_args(node)], env)
    _wait_for_job_server(node)
    return node


def start_worker(ip: str, cpus: int, head: RayNode) -> RayNode:
    """A node on ``ip`` joining ``head``'s cluster; returns once the cluster counts its CPUs."""
    node = RayNode(ip=ip, cpus=cpus, token=head.token, temp=Path(tempfile.mkdtemp(prefix="rn", dir="/tmp")),
                   gcs=head.gcs)
    restart(node, head)
    return node


def restart(node: RayNode, head: RayNode) -> None:
    """(Re)starts worker node ``node`` (stopped or killed) and waits until the head sees it alive."""
    _launch(node, [f"--address={head.gcs}", *_common_args(node)], _node_env(node, single=False))
    wait_for_nodes(head, {node.ip, head.ip})


def alive_nodes(head: RayNode) -> set[str]:
    """The IPs of the nodes the head's GCS counts alive (Ray's state API through the Jobs server, asked live)."""
    request = urllib.request.Request(f"{head.url}/api/v0/nodes", headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        nodes = json.loads(response.read())["data"]["result"]["result"]
    return {n["node_ip"] for n in nodes if n["state"] == "ALIVE"}


def wait_for_nodes(head: RayNode, ips: set[str], timeout_s: float = START_TIMEOUT_S) -> None:
    """Waits until exactly ``ips`` are the alive nodes of ``head``'s cluster."""
    deadline, seen = time.monotonic() + timeout_s, set()
    while time.monotonic() < deadline:
        try:
            seen = alive_nodes(head)
            if seen == ips:
                return
        except (OSError, KeyError, ValueError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the cluster's alive nodes are {sorted(seen)}, not {sorted(ips)}, after {timeout_s:.0f} s")


def _wait_for_job_server(node: RayNode) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if node.proc is not None and node.proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {node.proc.returncode}:\n{node.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{node.url}/api/authentication_mode", timeout=2) as response:
                if json.loads(response.read()).get("authentication_mode") == "token":
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"job server at {node.url} silent for {START_TIMEOUT_S:.0f} s:\n{node.log.read_text()[-3000:]}")


def remove(node: RayNode) -> None:
    """Stops the node and deletes its temp dir."""
    node.stop()
    shutil.rmtree(node.temp, ignore_errors=True)
