"""Ray token authentication for the job client.

Ray 2.60's ``ray start --head`` turns token auth on by default (it writes
``~/.ray/auth_token`` and sets ``RAY_AUTH_MODE=token`` for its own processes). A client
only sends the token when ``RAY_AUTH_MODE=token`` is set *before* Ray reads its config
(once per process); with the mode unset, ``JobSubmissionClient`` gets
"401 Missing authentication token" even though the token file sits right there.

So we do not depend on that process-wide switch: the job server says whether it wants
a token (``/api/authentication_mode`` is public), we look the token up in Ray's own
order and send it as the ``Authorization: Bearer`` header, which the SDK keeps.
The job needs nothing from us: it inherits ``RAY_AUTH_MODE`` and the token from the
head's environment, so the token is never put into the job's runtime_env (which the
dashboard shows to anyone who can list jobs).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
HOW_TO_SET = (
    "set RAY_AUTH_MODE=token and provide the cluster's token (print it on the head with `ray get-auth-token`) "
    "in one of, by precedence: RAY_AUTH_TOKEN (the token itself), RAY_AUTH_TOKEN_PATH (a file holding it), "
    "~/.ray/auth_token"
)


class AuthError(RuntimeError):
    """Token auth is required but no usable token is found, or the server refused it."""


@dataclass(frozen=True)
class Token:
    value: str
    source: str  # where it came from, for messages; never the value itself


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token(environ: Mapping[str, str] | None = None, default_path: Path | None = None) -> Token | None:
    """Ray's order: ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``, then ``~/.ray/auth_token``.

    As in Ray, a ``RAY_AUTH_TOKEN_PATH`` that cannot be read is an error, not a reason to fall back.
    """
    env = os.environ if environ is None else environ
    value = env.get(TOKEN_ENV, "").strip()
    if value:
        return Token(value, TOKEN_ENV)
    path_setting = env.get(TOKEN_PATH_ENV, "").strip()
    if path_setting:
        path = Path(path_setting).expanduser()
        try:
            text = path.read_text().strip()
        except OSError as err:
            raise AuthError(f"{TOKEN_PATH_ENV}={path_setting} cannot be read ({err.strerror})") from err
        if not text:
            raise AuthError(f"{TOKEN_PATH_ENV}={path_setting} is empty")
        return Token(text, f"{TOKEN_PATH_ENV}={path_setting}")
    path = default_path or default_token_path()
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return Token(text, str(path)) if text else None


def headers_for(server_mode: str | None, address: str) -> tuple[dict[str, str], Token | None]:
    """HTTP headers that authenticate this client to a job server in ``server_mode``.

    ``None`` (server too old to say) sends a token when one is found and nothing otherwise.
    """
    if server_mode == "disabled":
        return {}, None
    token = find_token()
    if token is None:
        if server_mode == "token":
            raise AuthError(f"the Ray cluster at {address} requires token authentication and no token was found: "
                            f"{HOW_TO_SET}")
        return {}, None
    return {"Authorization": f"Bearer {token.value}"}, token


def explain_refusal(err: Exception, address: str, token: Token | None) -> AuthError:
    """Turns Ray's ``AuthenticationError`` (401/403) into one message that says which token was tried."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if token is None:
        return AuthError(f"{address} refused the request ({first}): {HOW_TO_SET}")
    return AuthError(f"{address} refused the token from {token.source} ({first}); it is not this cluster's "
                     f"token: {HOW_TO_SET}")
