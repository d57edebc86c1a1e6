"""Ray actor classes and the actor-group manager (the Ray strategies).

This file must not import Ray: :func:`keep_embedded_ray_on_loopback` has to run first.
"""

from __future__ import annotations

import os


def keep_embedded_ray_on_loopback(address: str | None) -> None:
    """Call before ``import ray`` when the embedded local cluster will be used (``address`` unset).

    Ray 2.60 replaces ``_node_ip_address="127.0.0.1"`` with the machine's routable address on
    Linux, and its processes then listen on every interface, unless multi-node support is off,
    which Ray reads once, at import. Only for the embedded cluster: a driver joining a real
    cluster must advertise a reachable address.
    """
    if not (address or os.environ.get("RAY_ADDRESS")):
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
