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
import ipaddress
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from launch import address as addr
from launch import auth, jobs
from launch import runtime_env as renv

COMMANDS = ("status", "stop", "logs")
PROBE_TIMEOUT_S = 10.0


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
               "parallel.gpus_per_actor=1. See docs/running-at-scale.md.",
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
                        help="directory holding `moe-train` on the head node; 'auto' (default): the head's PATH, "
                             "and for a 127.0.0.1/localhost address this Python's bin dir if PATH has none; "
                             "'none': the head's PATH only")
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


# ---------------------------------------------------------------- the job's command


def _is_local(url: str) -> bool:
    """A loopback address (any of 127.0.0.0/8, ::1) or ``localhost``."""
    host = urlparse(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def entrypoint(overrides: list[str], program: str = "moe-train") -> str:
    """The shell command the job server runs; overrides are quoted so ``data.paths=[a,b]`` survives the shell."""
    return " ".join([program, *(shlex.quote(o) for o in overrides)])


def program_for(setting: str, address: addr.Address) -> str:
    """How the job finds ``moe-train`` on the head node (the job runs with the head's environment, not ours).

    ``auto`` with a loopback address: the head's ``PATH`` first, else this venv's script, because a
    local head started with ``.venv/bin/ray start`` (venv not activated) has no ``moe-train`` on its
    PATH, while a loopback address may also be an SSH/kubectl port-forward to a remote head, where
    our path means nothing. The script is named, not put on ``PATH``: the job keeps the head's
    environment.
    """
    if setting == "none" or (setting == "auto" and not _is_local(address.url)):
        return "moe-train"
    if setting == "auto":
        fallback = shlex.quote(str(renv.local_bin_dir() / "moe-train"))
        return f'"$(command -v moe-train || echo {fallback})"'
    return shlex.quote(str(Path(setting).expanduser() / "moe-train"))


def _runtime_env(args: argparse.Namespace) -> dict[str, Any]:
    working_dir = renv.check_working_dir(args.working_dir or renv.project_root())
    return renv.build(working_dir, pip=args.pip, env_vars=renv.parse_env(args.env), extra_json=args.runtime_env_json)


# ---------------------------------------------------------------- commands


def run_submit(args: argparse.Namespace) -> int:
    address = addr.resolve(args.address)
    runtime_env = renv.with_stop_grace(_runtime_env(args), args.overrides)  # local mistakes first, before any network
    command = entrypoint(args.overrides, program_for(args.bin_dir, address))
    client = jobs.connect(address, args.timeout)
    _err(f"submitting to {address.url}: {command}")
    _err(f"runtime_env: {renv.describe(runtime_env)}")
    t0 = time.monotonic()
    job_id = jobs.submit(client, address, command, runtime_env, args.job_id)
    print(job_id, flush=True)
    suffix = "" if address.source == "default" else f" --address {address.url}"
    _err(f"submitted {job_id} in {time.monotonic() - t0:.1f} s; status: moe-submit status {job_id}{suffix}; "
         f"stop: moe-submit stop {job_id}{suffix}")
    if args.no_wait:
        return 0
    try:
        jobs.follow(client, job_id)
        jobs.wait_terminal(client, job_id)
    except KeyboardInterrupt:
        _err(f"stopped following; job {job_id} keeps running. Stop it with: moe-submit stop {job_id}{suffix}")
        return 130
    info = client.get_job_info(job_id)
    code = jobs.outcome(info)
    if code == 0:
        _err(f"job {job_id} SUCCEEDED in {time.monotonic() - t0:.1f} s")
    else:
        for line in jobs.failure_report(info, job_id):
            _err(line)
    return code


def run_status(args: argparse.Namespace) -> int:
    client = jobs.connect(addr.resolve(args.address), args.timeout)
    print("\n".join(jobs.describe_status(jobs.job_info(client, args.job_id), args.job_id)))
    return 0


def run_stop(args: argparse.Namespace) -> int:
    client = jobs.connect(addr.resolve(args.address), args.timeout)
    jobs.job_info(client, args.job_id)  # a clear "no such job" before stop_job's generic error
    if not client.stop_job(args.job_id):
        print(f"{args.job_id}: not running ({client.get_job_status(args.job_id)})")
        return 0
    if args.no_wait:
        print(f"{args.job_id}: stop requested")
        return 0
    status = jobs.wait_terminal(client, args.job_id, timeout_s=60)
    print(f"{args.job_id}: {status}")
    return 0 if status.is_terminal() else 1


def run_logs(args: argparse.Namespace) -> int:
    client = jobs.connect(addr.resolve(args.address), args.timeout)
    jobs.job_info(client, args.job_id)
    if args.follow:
        jobs.follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


_RUNNERS: dict[str, Callable[[argparse.Namespace], int]] = {"status": run_status, "stop": run_stop,
                                                            "logs": run_logs}


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
    except (addr.AddressError, auth.AuthError, renv.RuntimeEnvError, jobs.JobError) as err:
        _err(str(err))
        return 2


if __name__ == "__main__":
    sys.exit(main())
