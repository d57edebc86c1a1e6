"""Talking to a Ray job server: connect (fast fail, token), submit, follow, and read a job's outcome.

Ray is imported only here and only once the address answered, so ``moe-submit --help`` and
address/token mistakes cost no Ray import, and the token decision is made before Ray's
client exists.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, TextIO

from launch import address as addr
from launch import auth
from moe_trainer.config.errors import first_line

AGENT_RETRY_S = 20.0  # a head that just started answers "No available agent" for a few seconds
NOT_FOUND_EXIT = 127  # the shell's "command not found"


class JobError(RuntimeError):
    """The job server refused or failed a request; printed as one line."""


def _quiet_ray_logging() -> None:
    """Ray's SDK logs every packaging step at INFO and warns that .git/.venv are skipped, which we want anyway."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # Ray sets INFO on each of these itself
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def connect(address: addr.Address, timeout_s: float) -> Any:
    """Checks the address answers (within ``timeout_s``), picks the token, then builds Ray's client.

    The probe comes first because ``JobSubmissionClient`` retries a dead address for a long time.
    """
    mode = addr.probe(address, timeout_s)
    headers, token = auth.headers_for(mode, address.url)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    _quiet_ray_logging()
    try:
        return JobSubmissionClient(address.url, headers=headers)
    except AuthenticationError as err:
        raise auth.explain_refusal(err, address.url, token) from err
    except (ConnectionError, RuntimeError) as err:
        raise JobError(f"the job server at {address.url} (from {address.source}) failed: {first_line(err)}") from err


def submit(client: Any, address: addr.Address, command: str, runtime_env: dict[str, Any], job_id: str | None) -> str:
    """``submit_job``, retrying only the "No available agent" answer of a head that has just started."""
    from ray.exceptions import AuthenticationError

    deadline = time.monotonic() + AGENT_RETRY_S
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=job_id,
                                     metadata={"launcher": "moe-submit"})
        except AuthenticationError as err:
            raise auth.explain_refusal(err, address.url, None) from err
        except (RuntimeError, ValueError, OSError) as err:
            no_agent = "No available agent" in str(err)
            if no_agent and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            hint = ("; the head's dashboard agent is not serving: see dashboard_agent.log in the head's "
                    "session logs (a port taken by another Ray: start the head with a free "
                    "--dashboard-agent-listen-port)") if no_agent else ""
            raise JobError(f"the job server at {address.url} did not take the job: {first_line(err)}{hint}") from err


def job_info(client: Any, job_id: str) -> Any:
    """``get_job_info`` with a plain "no such job" instead of Ray's HTTP error text."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobError(f"no job {job_id} on this cluster") from err
        raise


async def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> None:
    """Streams the job's logs until it ends; a dropped log stream is reported and the caller polls instead."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except (RuntimeError, OSError) as err:  # websocket closed abnormally, a proxy dropped it, ...
        print(f"moe-submit: log stream interrupted ({first_line(err)}); waiting for the job to end",
              file=sys.stderr, flush=True)


def wait_terminal(client: Any, job_id: str, timeout_s: float | None = None, poll_s: float = 0.5) -> Any:
    """Polls until the job is SUCCEEDED, FAILED or STOPPED (the log stream can end a moment earlier)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        status = client.get_job_status(job_id)
        if status.is_terminal() or (deadline is not None and time.monotonic() > deadline):
            return status
        time.sleep(poll_s)


def outcome(info: Any) -> int:
    """Exit status for a finished job: 0 when it SUCCEEDED, 1 otherwise (its own exit code is printed)."""
    return 0 if str(info.status) == "SUCCEEDED" else 1


def failure_report(info: Any, job_id: str) -> list[str]:
    """Why the job ended: status and exit code, then Ray's message (first line and the log tail it quotes)."""
    code = getattr(info, "driver_exit_code", None)
    lines = [f"job {job_id} {info.status}" + (f" (moe-train exit code {code})" if code is not None else "")]
    if code == NOT_FOUND_EXIT:
        lines.append("  moe-train is not installed on the head node: install the project there "
                     "(see launch/cluster.yaml) or name its bin directory with --bin-dir")
    message = (info.message or "").strip().splitlines()
    shown = message if len(message) <= 12 else [message[0], "...", *message[-10:]]
    return lines + [f"  {line}" for line in shown]


def describe_status(info: Any, job_id: str) -> list[str]:
    """``moe-submit status``: one line per fact, the message's tail last (that is where errors are)."""

    def when(ms: int | None) -> str:
        return "-" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))

    lines = [f"{job_id}: {info.status}", f"  entrypoint: {info.entrypoint}",
             f"  started: {when(info.start_time)}  ended: {when(info.end_time)}"]
    if info.driver_exit_code is not None:
        lines.append(f"  exit code: {info.driver_exit_code}")
    message = (info.message or "").strip().splitlines()
    if message:
        lines.append(f"  message: {message[0]}")
        lines.extend(f"    {line}" for line in message[1:][-10:])
    return lines
