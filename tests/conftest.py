"""Shared fixtures: compose real Hydra configs the way ``moe-train`` does."""

from __future__ import annotations

import atexit
import functools
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from actors import keep_embedded_ray_on_loopback
from moe_trainer.cli import CONF_DIR
from moe_trainer.config.schema import Config, register_configs, to_dataclass
from tests.ray_nodes import RayNode, alive_nodes, clean_env, remove, restart, start_head, start_worker

register_configs()
# One intra-op thread in this process: its tensors are tiny, and the two cores are shared with the Ray actors
# and bug drivers that run beside it, so a second thread mostly spin-waits (tests/moe/test_layer.py's three
# balancing tests: 29 s with two threads, 5.3 s with one, beside two training runs). Actors set their own
# threads from their CPU reservation; subprocesses keep torch's default.
torch.set_num_threads(1)
# data.token_cache (and the BPEs stored in it) under a directory of this session, not the user's
# ~/.cache: a test must see its own first start, never a cache an earlier session left
_CACHE = tempfile.mkdtemp(prefix="moe-trainer-cache-")
os.environ["MOE_TRAINER_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
keep_embedded_ray_on_loopback(None)  # before any test module imports Ray: the test cluster stays on 127.0.0.1


BUGS_MODULE = Path(__file__).parent / "actors" / "test_bugs_are_caught.py"
_in_background = False  # the bug drivers were started beside other tests, not by the first bug test
# test directories that run before the bug drivers start: those that start Ray actors or clusters of their own
# (actors, launch) and the ones between them in the session's order
BEFORE_BUG_DRIVERS = {"actors", "benchmarks", "config", "data", "launch"}


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The bug-injection tests run last: their drivers run in the background meanwhile (``bug_drivers``)."""
    items.sort(key=lambda item: item.path == BUGS_MODULE)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def bug_drivers(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory,
                request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The bug-injection cases' driver processes (``tests/actors/test_bugs_are_caught.py``), one at a time
    in the background from the first test after the Ray strategy tests (or the first bug test)."""
    from tests.actors.test_bugs_are_caught import selected, start_drivers

    # alone (only these tests selected, nothing to overlap with): two at a time keep both cores busy
    traces, pool = start_drivers(tmp_path_factory, selected(request.session), at_once=1 if _in_background else 2)
    yield traces
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(autouse=True)
def _bug_drivers_start_after_the_ray_strategy_tests(request: pytest.FixtureRequest) -> None:
    """Once the tests that start many actors are done (``tests/actors`` and ``tests/launch``), the bug
    drivers start and share the machine with the mostly single-process tests that follow, instead of
    running alone at the end."""
    global _in_background
    if Path(request.node.path).parent.name not in BEFORE_BUG_DRIVERS and _runs_bug_tests(request.session):
        _in_background = True
        request.getfixturevalue("bug_drivers")


@functools.cache
def _runs_bug_tests(session: pytest.Session) -> bool:
    return any(item.path == BUGS_MODULE for item in session.items)


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never talk to W&B or the Hub, whatever the developer's environment says."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", os.environ.get("WANDB_MODE", "offline"))


def compose_dict(overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """``with_hydra``: keep Hydra's own node (``hydra.run.dir``, ...), as its callbacks see the config."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=with_hydra)


@pytest.fixture
def make_config() -> Callable[..., Config]:
    """``make_config("moe.top_k=1", ...)``: the debug experiment plus overrides, as typed dataclasses."""

    def build(*overrides: str) -> Config:
        return to_dataclass(compose_dict(["experiment=debug", *overrides]))

    return build


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture(scope="session")
def one_rank_gloo() -> Iterator[Any]:
    """This test process as a one-rank gloo group, for the distributed dispatchers in-process.

    Session-wide: joining it initialises DeepSpeed's communication backend, which costs seconds.
    """
    from moe_trainer.parallel.comm import one_rank_group

    with one_rank_group("gloo") as world:
        yield world


@dataclass
class TwoNodeCluster:
    """A real Ray cluster of two nodes on loopback (``tests/ray_nodes.py``): what a user's cluster is."""

    head: RayNode  # 127.0.0.3: GCS, Ray Jobs server, 2 CPUs
    worker: RayNode  # 127.0.0.2: 2 CPUs

    def driver_env(self, **extra: str) -> dict[str, str]:
        """A ``moe-train`` process's environment to join this cluster (``cluster.address=`` the head's GCS)."""
        return clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.head.token, WANDB_MODE="offline", **extra)

    def ensure_worker(self) -> None:
        """The second node alive again (a test before may have killed it)."""
        if self.worker.ip not in alive_nodes(self.head):
            restart(self.worker, self.head)


@pytest.fixture(scope="session")
def two_nodes() -> Iterator[TwoNodeCluster]:
    """Started once per session by the first test that asks (``moe-submit``'s, the multi-node ones)."""
    head = start_head("127.0.0.3", cpus=2, token=secrets.token_hex(32))
    try:
        worker = start_worker("127.0.0.2", cpus=2, head=head)
    except BaseException:
        remove(head)
        raise
    try:
        yield TwoNodeCluster(head, worker)
    finally:
        remove(worker)
        remove(head)


@pytest.fixture(scope="session")
def ray_cluster() -> object:
    """One local Ray for the whole session, on 127.0.0.1, with 4 logical CPUs.

    The machine has 2 cores; 4 logical CPUs let 4-actor tests place their actors
    (oversubscribed, which only costs speed). The driver code reuses this connection.
    """
    import ray

    ray.init(address="local", num_cpus=4, _node_ip_address="127.0.0.1", include_dashboard=False,
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
