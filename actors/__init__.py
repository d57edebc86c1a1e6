"""Ray actor classes and the actor-group manager (the Ray strategies).

This file must not import Ray: :func:`keep_embedded_ray_on_loopback` and
:func:`ask_embedded_ray_for_token_auth` have to run first.
"""

from __future__ import annotations

import os
import sys


def keep_embedded_ray_on_loopback(address: str | None) -> None:
    """Call before ``import ray`` when the embedded local cluster will be used (``address`` unset).

    Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` with the machine's routable address on
    Linux, and its processes then listen on every interface, unless multi-node support is off,
    which Ray reads once, at import. Only for the embedded cluster: a driver joining a real
    cluster must advertise a reachable address.
    """
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def ask_embedded_ray_for_token_auth(address: str | None) -> None:
    """Call before ``import ray``: asks the embedded local cluster for token authentication explicitly.

    Ray 2.60 turns token authentication on for a new local cluster when ``RAY_AUTH_MODE`` is
    unset, and then prints a notice on how to turn it off. Setting ``RAY_AUTH_MODE=token``
    first is the same setting without the notice; authentication stays on, and a
    ``RAY_AUTH_MODE`` the user set is kept. Ray reads the variable once, at import, so where
    Ray is already imported (a test session's own cluster) nothing is changed.
    """
    if "ray" not in sys.modules and not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_AUTH_MODE", "token")
