"""Fixtures of the Ray strategy tests."""

from __future__ import annotations

from typing import Any

import pytest

from tests.actors.equivalence import Trace, trace


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``single``'s trace of a feature mix, computed once per session (equivalence and bug-injection tests)."""
    cache: dict[str, Trace] = {}

    def get(mix: str) -> Trace:
        if mix not in cache:
            cache[mix] = trace(tmp_path_factory.mktemp(f"single-{mix}"), mix)
        return cache[mix]

    return get
