"""``moe-submit``: run ``moe-train`` on a Ray cluster as a Ray Job, follow it, exit with its outcome.

    moe-submit [--address URL] [--no-wait] [--working-dir DIR] [--job-id ID] [--] OVERRIDES...
    moe-submit status JOB_ID [--address URL]
    moe-submit stop JOB_ID [--address URL]
    moe-submit logs JOB_ID [--follow] [--address URL]

The job is ``moe-train OVERRIDES`` run by the job server on the head node; inside it Ray
sets ``RAY_ADDRESS`` to the cluster's GCS address, so ``parallel=...`` strategies put their
actors on the cluster. Exit status: 0 when the job SUCCEEDED; 1 when it FAILED or was STOPPED
(its message and ``moe-train``'s own exit code are printed); 2 when it could not be submitted
(usage, address, token, runtime_env); 130 when interrupted (the job keeps running).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

from launch import address as addr
from launch import auth
from launch import runtime_env as renv

COMMANDS = ("status", "stop", "logs")
PROBE_TIMEOUT_S = 10.0
AGENT_RETRY_S = 20.0  # a head that just started answers "No available agent" for a few seconds
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


class SubmitError(RuntimeError):
    """Anything that stops ``moe-submit`` before or while talking to the job server; printed as one line."""


def _err(message: str) -> None:
    print(f"moe-submit: {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- arguments


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="job server URL (the head's dashboard, http://HEAD:8265); default: "
                        f"RAY_ADDRESS, else {addr.DEFAULT_ADDRESS}. Not the GCS address HEAD:6379")
    parser.add_argument("--timeout", type=float, default=PROBE_TIMEOUT_S,
                        help="seconds to wait for the job server to answer the first request (default %(default)g)")


def _submit_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-submit",
        description="Submit `moe-train OVERRIDES` to a Ray cluster as a Ray Job and follow its logs. "
                    "Other commands: `moe-submit status|stop|logs JOB_ID`.",
        epilog="Example: moe-submit --address http://HEAD:8265 -- parallel=expert_parallel parallel.num_actors=8 "
               "parallel.gpus_per_actor=1",
    )
    _add_common(parser)
    parser.add_argument("--no-wait", action="store_true", help="print the job id and exit 0 once submitted")
    parser.add_argument("--working-dir", type=Path, default=None,
                        help="project directory uploaded as the job's working_dir (default: this repository)")
    parser.add_argument("--job-id", help="submission id to use (default: chosen by Ray)")
    parser.add_argument("--pip", action="append", default=[], metavar="REQ",
                        help="extra pip requirement installed into a per-job virtualenv on the nodes (repeatable)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY[=VALUE]",
                        help="environment variable for the job; a bare KEY forwards this shell's value "
                             "(e.g. --env WANDB_API_KEY); values are visible to anyone who can list jobs")
    parser.add_argument("--bin-dir", default="auto",
                        help="directory put first on the job's PATH, holding `moe-train` on the cluster's nodes; "
                             "'auto' (default): this Python's bin dir when the address is on this machine "
                             "(127.0.0.1/localhost), nothing otherwise; 'none': never")
    parser.add_argument("--runtime-env-json", metavar="JSON",
                        help="runtime_env fields merged over the defaults, e.g. "
                             "'{\"pip\": [\"wandb\"], \"env_vars\": {\"NCCL_DEBUG\": \"INFO\"}}'")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for moe-train (put `--` before any "
                        "that start with '-')")
    return parser


def _command_parser(command: str) -> argparse.ArgumentParser:
    helps = {"status": "print a job's status and message", "stop": "stop a running job",
             "logs": "print a job's logs"}
    parser = argparse.ArgumentParser(prog=f"moe-submit {command}", description=helps[command])
    parser.add_argument("job_id")
    _add_common(parser)
    if command == "logs":
        parser.add_argument("--follow", "-f", action="store_true", help="keep streaming until the job ends")
    if command == "stop":
        parser.add_argument("--no-wait", action="store_true", help="do not wait for the job to stop")
    return parser


# ---------------------------------------------------------------- connecting


def connect(address: addr.Address, timeout_s: float) -> Any:
    """Checks the address answers (fast), picks the token, then builds Ray's client.

    The probe comes first because ``JobSubmissionClient`` retries a dead address for a long time.
    """
    mode = addr.probe(address, timeout_s)
    headers, token = auth.headers_for(mode, address.url)
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    try:
        client = JobSubmissionClient(address.url, headers=headers)
    except AuthenticationError as err:
        raise auth.explain_refusal(err, address.url, token) from err
    except (ConnectionError, RuntimeError) as err:
        raise SubmitError(f"the job server at {address.url} (from {address.source}) failed: "
                          f"{_first_line(err)}") from err
    return client


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _is_local(url: str) -> bool:
    return (urlparse(url).hostname or "") in _LOCAL_HOSTS


# ---------------------------------------------------------------- submit and follow


def entrypoint(overrides: list[str]) -> str:
    """The shell command the job server runs; overrides are quoted so ``data.paths=[a,b]`` survives the shell."""
    return shlex.join(["moe-train", *overrides])


def _runtime_env(args: argparse.Namespace, address: addr.Address) -> dict[str, Any]:
    working_dir = renv.check_working_dir(args.working_dir or renv.project_root())
    if args.bin_dir == "auto":
        bin_dir = renv.local_bin_dir() if _is_local(address.url) else None
    elif args.bin_dir == "none":
        bin_dir = None
    else:
        bin_dir = Path(args.bin_dir)
    return renv.build(working_dir, pip=args.pip, env_vars=renv.parse_env(args.env), bin_dir=bin_dir,
                      extra_json=args.runtime_env_json)


def _submit(client: Any, command: str, runtime_env: dict[str, Any], job_id: str | None) -> str:
    """``submit_job``, retrying only the head's "No available agent" answer for a few seconds after it starts."""
    deadline = time.monotonic() + AGENT_RETRY_S
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env, submission_id=job_id,
                                     metadata={"launcher": "moe-submit"})
        except RuntimeError as err:
            if "No available agent" in str(err) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise


async def _stream_logs(client: Any, job_id: str, out: TextIO) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()


def follow(client: Any, job_id: str, out: TextIO = sys.stdout) -> None:
    """Streams the job's logs until it ends; a dropped log stream falls back to polling the status."""
    try:
        asyncio.run(_stream_logs(client, job_id, out))
    except (RuntimeError, OSError) as err:  # websocket closed abnormally, proxy dropped it, ...
        _err(f"log stream interrupted ({_first_line(err)}); waiting for the job to end")


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


def report_failure(info: Any, job_id: str) -> None:
    """Prints why the job ended: Ray's message (its first line and the last lines of the log it quotes)."""
    message = (info.message or "").strip()
    code = getattr(info, "driver_exit_code", None)
    _err(f"job {job_id} {info.status}" + (f" (moe-train exit code {code})" if code is not None else ""))
    if not message:
        return
    lines = message.splitlines()
    shown = lines if len(lines) <= 12 else [lines[0], "  ...", *lines[-10:]]
    for line in shown:
        print(f"  {line}", file=sys.stderr)
    sys.stderr.flush()


def _quiet_ray_logging() -> None:
    """Ray's SDK logs every packaging step at INFO, and warns that .git/.venv are skipped, which we want."""
    for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # Ray sets INFO on each of these itself
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def run_submit(args: argparse.Namespace) -> int:
    address = addr.resolve(args.address)
    runtime_env = _runtime_env(args, address)  # local mistakes first, before any network
    command = entrypoint(args.overrides)
    client = connect(address, args.timeout)
    _quiet_ray_logging()
    from ray.exceptions import AuthenticationError

    _err(f"submitting to {address.url}: {command}")
    _err(f"runtime_env: {renv.describe(runtime_env)}")
    t0 = time.monotonic()
    try:
        job_id = _submit(client, command, runtime_env, args.job_id)
    except AuthenticationError as err:
        raise auth.explain_refusal(err, address.url, None) from err
    except (RuntimeError, ValueError, OSError) as err:
        raise SubmitError(f"the job server at {address.url} did not take the job: {_first_line(err)}") from err
    print(job_id, flush=True)
    suffix = "" if address.source == "default" else f" --address {address.url}"
    _err(f"submitted {job_id} in {time.monotonic() - t0:.1f} s; status: moe-submit status {job_id}{suffix}; "
         f"stop: moe-submit stop {job_id}{suffix}")
    if args.no_wait:
        return 0
    try:
        follow(client, job_id)
        wait_terminal(client, job_id)
    except KeyboardInterrupt:
        _err(f"stopped following; job {job_id} keeps running. Stop it with: moe-submit stop {job_id}{suffix}")
        return 130
    info = client.get_job_info(job_id)
    code = outcome(info)
    if code == 0:
        _err(f"job {job_id} SUCCEEDED in {time.monotonic() - t0:.1f} s")
    else:
        report_failure(info, job_id)
    return code


# ---------------------------------------------------------------- status / stop / logs


def _when(ms: int | None) -> str:
    return "-" if not ms else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000))


def run_status(args: argparse.Namespace) -> int:
    client = connect(addr.resolve(args.address), args.timeout)
    info = _job_info(client, args.job_id)
    print(f"{args.job_id}: {info.status}")
    print(f"  entrypoint: {info.entrypoint}")
    print(f"  started: {_when(info.start_time)}  ended: {_when(info.end_time)}")
    if info.driver_exit_code is not None:
        print(f"  exit code: {info.driver_exit_code}")
    if info.message:
        lines = info.message.strip().splitlines()
        print(f"  message: {lines[0]}")
        for line in lines[1:][-10:]:
            print(f"    {line}")
    return 0


def run_stop(args: argparse.Namespace) -> int:
    client = connect(addr.resolve(args.address), args.timeout)
    _job_info(client, args.job_id)  # a clear "no such job" before stop_job's generic error
    was_running = client.stop_job(args.job_id)
    if not was_running:
        print(f"{args.job_id}: not running ({client.get_job_status(args.job_id)})")
        return 0
    if args.no_wait:
        print(f"{args.job_id}: stop requested")
        return 0
    status = wait_terminal(client, args.job_id, timeout_s=60)
    print(f"{args.job_id}: {status}")
    return 0 if status.is_terminal() else 1


def run_logs(args: argparse.Namespace) -> int:
    client = connect(addr.resolve(args.address), args.timeout)
    _job_info(client, args.job_id)
    if args.follow:
        follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _job_info(client: Any, job_id: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise SubmitError(f"no job {job_id} on this cluster") from err
        raise


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    runner: Callable[[argparse.Namespace], int] = run_submit
    if argv and argv[0] in COMMANDS:
        command, rest = argv[0], argv[1:]
    else:
        args = _submit_parser().parse_intermixed_args(argv)
        command, rest = "", []
        if args.overrides and args.overrides[0] in COMMANDS:  # `moe-submit --address X status ID`
            command = args.overrides[0]
            rest = args.overrides[1:] + (["--address", args.address] if args.address else [])
    if command:
        args, runner = _command_parser(command).parse_args(rest), _RUNNERS[command]
    try:
        return runner(args)
    except (addr.AddressError, auth.AuthError, renv.RuntimeEnvError, SubmitError) as err:
        _err(str(err))
        return 2


_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {"status": run_status, "stop": run_stop,
                                                            "logs": run_logs}

if __name__ == "__main__":
    sys.exit(main())
