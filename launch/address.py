"""Which job server to talk to, and a quick check that it answers before Ray's client retries for minutes.

Two Ray addresses are easy to mix up:

- the *job server* (the dashboard's HTTP API, ``http://HEAD:8265``): what ``moe-submit``,
  ``ray job submit`` and ``JobSubmissionClient`` use;
- the *GCS* (``HEAD:6379``): what ``ray.init`` / ``moe-train cluster.address=...`` connect to.
  Inside a job Ray sets ``RAY_ADDRESS`` to this one.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from dataclasses import dataclass

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
_WHICH_PORT = ("the job server is the head's dashboard port (default 8265, e.g. http://HEAD:8265); "
               "HEAD:6379 is the GCS port that ray.init and cluster.address use")


class AddressError(RuntimeError):
    """The job server cannot be reached or is not a Ray job server; the message names the address."""


@dataclass(frozen=True)
class Address:
    url: str
    source: str  # "--address", "RAY_ADDRESS" or "default": said in error messages so users know what to change


def resolve(cli_address: str | None) -> Address:
    """``--address``, else ``RAY_ADDRESS``, else the local default; normalised to ``http(s)://host:port``."""
    if cli_address:
        return Address(normalize(cli_address), "--address")
    env = os.environ.get("RAY_ADDRESS")
    if env:
        return Address(normalize(env), "RAY_ADDRESS")
    return Address(DEFAULT_ADDRESS, "default")


def normalize(address: str) -> str:
    """Adds ``http://`` to a bare ``host:port``; refuses Ray Client addresses, which have no jobs API."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise AddressError(f"{address} is a Ray Client address (port 10001), not a job server; {_WHICH_PORT}")
    if "://" not in address:
        address = "http://" + address
    return address


def probe(address: Address, timeout_s: float) -> str | None:
    """Asks the job server its authentication mode (a public endpoint, so this works before any token).

    Returns ``"token"``, ``"disabled"``, or ``None`` for servers too old to say (Ray < 2.52).
    Raises :class:`AddressError` within about ``timeout_s`` seconds when nothing usable answers.
    """
    url = address.url
    where = f"{url} (from {address.source})"
    request = urllib.request.Request(f"{url}/api/authentication_mode", headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise AddressError(f"{where} answered HTTP {err.code} to a Ray API request; {_WHICH_PORT}") from err
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise AddressError(f"no Ray job server answered at {where} within {timeout_s:g} s; "
                               f"{_WHICH_PORT}") from err
        raise AddressError(f"no Ray job server at {where}: {reason}; is the head running? {_WHICH_PORT}") from err
    except TimeoutError as err:
        raise AddressError(f"no Ray job server answered at {where} within {timeout_s:g} s; {_WHICH_PORT}") from err
    except (http.client.HTTPException, ConnectionError) as err:
        raise AddressError(f"{where} does not speak HTTP ({type(err).__name__}); is it the GCS port? "
                           f"{_WHICH_PORT}") from err
    try:
        mode = json.loads(body).get("authentication_mode")
    except (ValueError, AttributeError) as err:
        raise AddressError(f"{where} answered, but not as a Ray job server; {_WHICH_PORT}") from err
    return str(mode) if mode else None
