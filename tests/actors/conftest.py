"""Fixtures of the Ray strategy tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.actors.equivalence import RUN, Trace, trace
from tests.helpers import RunResult, train_run


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``single``'s trace of a feature mix, computed once per session (equivalence and bug-injection tests)."""
    cache: dict[str, Trace] = {}

    def get(mix: str) -> Trace:
        if mix not in cache:
            cache[mix] = trace(tmp_path_factory.mktemp(f"single-{mix}"), mix)
        return cache[mix]

    return get


@pytest.fixture(scope="session")
def moe_train_run(ray_cluster: object, tmp_path_factory: pytest.TempPathFactory
                  ) -> Callable[..., tuple[Path, RunResult]]:
    """``moe_train_run(*overrides)``: the run dir and result of a ``moe-train`` run of ``RUN`` plus ``overrides``
    (``tests/actors/equivalence.py``), trained once per session for the tests of every file that read it."""
    cache: dict[tuple[str, ...], tuple[Path, RunResult]] = {}

    def get(*overrides: str) -> tuple[Path, RunResult]:
        if overrides not in cache:
            run_dir = tmp_path_factory.mktemp("moe-train") / "run"
            cache[overrides] = run_dir, train_run(run_dir, *RUN, *overrides)
        return cache[overrides]

    return get
