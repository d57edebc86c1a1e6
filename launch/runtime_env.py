"""The job's ``runtime_env``: this project's source as ``working_dir``, plus what the user adds.

``working_dir`` is zipped, uploaded to the head (limit 100 MiB after excludes) and
unpacked on every node that runs the job's processes; it becomes their cwd and is put
first on ``PYTHONPATH``, so the job runs the code you submitted even where an older copy
of the project is installed. The *environment* (torch, deepspeed, ray, and the
``moe-train`` script) must already exist on the nodes, or come from ``pip``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

# gitignore syntax, relative to the working_dir; Ray also honours the project's .gitignore.
DEFAULT_EXCLUDES = [
    ".git", ".venv", "venv", "outputs", "multirun", "wandb", "**/__pycache__", "*.egg-info", "*.pyc",
    "benchmarks/results", ".pytest_cache", ".ruff_cache", "build", "dist", "checkpoints", "*.pt",
]


class RuntimeEnvError(ValueError):
    """A ``runtime_env`` setting given on the command line is unusable."""


def project_root() -> Path:
    """The source tree this package belongs to (an editable install, as the README sets up)."""
    return Path(__file__).resolve().parents[1]


def check_working_dir(path: Path) -> Path:
    """Refuses a directory that is not this project, which would give the job no ``conf/`` or code."""
    path = path.expanduser().resolve()
    if not (path / "moe_trainer").is_dir() or not (path / "conf").is_dir():
        raise RuntimeEnvError(f"--working-dir {path} is not the moe-trainer project (no moe_trainer/ and conf/); "
                              "pass the repository root")
    return path


def parse_env(items: list[str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """``KEY=VALUE`` sets a value; a bare ``KEY`` forwards this shell's value (e.g. ``--env WANDB_API_KEY``)."""
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not key.replace("_", "").isalnum():
            raise RuntimeEnvError(f"--env {item!r}: expected KEY=VALUE or KEY")
        if not sep:
            if key not in env:
                raise RuntimeEnvError(f"--env {key}: {key} is not set in this shell")
            value = env[key]
        out[key] = value
    return out


def local_bin_dir() -> Path:
    """Where this interpreter's console scripts (``moe-train``) live: its venv's ``bin``."""
    return Path(sys.executable).parent


def build(working_dir: Path, *, pip: list[str], env_vars: dict[str, str], extra_json: str | None) -> dict[str, Any]:
    """Assembles the runtime_env; ``extra_json`` (``--runtime-env-json``) is merged last and wins."""
    runtime_env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(DEFAULT_EXCLUDES)}
    if pip:
        runtime_env["pip"] = list(pip)
    if env_vars:
        runtime_env["env_vars"] = dict(env_vars)
    if extra_json:
        try:
            extra = json.loads(extra_json)
        except json.JSONDecodeError as err:
            raise RuntimeEnvError(f"--runtime-env-json is not valid JSON: {err}") from err
        if not isinstance(extra, dict):
            raise RuntimeEnvError("--runtime-env-json must be a JSON object")
        for key, value in extra.items():
            if key == "env_vars" and isinstance(value, dict):
                runtime_env.setdefault("env_vars", {}).update(value)
            elif key == "excludes" and isinstance(value, list):
                runtime_env["excludes"] = runtime_env.get("excludes", []) + value
            else:
                runtime_env[key] = value
    return runtime_env


# Ray Jobs' stop (``moe-submit stop``) sends the driver SIGTERM, then SIGKILL after this many seconds (Ray's
# default: 3), read by the job's supervisor from the job's runtime_env
STOP_WAIT_VAR = "RAY_JOB_STOP_WAIT_TIME_S"
STOP_MARGIN_S = 30  # after moe-train's own bound: W&B's close and the process exit


def preempt_timeout_s(overrides: list[str]) -> float:
    """``fault_tolerance.preempt_timeout_s`` as the job will see it: the override's value, else the default."""
    from moe_trainer.config.schema import FaultToleranceConfig

    value: float = FaultToleranceConfig.preempt_timeout_s
    for override in overrides:
        key, _, text = override.lstrip("+").partition("=")
        if key == "fault_tolerance.preempt_timeout_s":
            try:
                value = float(text)
            except ValueError:
                pass  # moe-train refuses it with the setting's name
    return value


def with_stop_grace(runtime_env: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Lets a stopped job save its checkpoint: Ray waits ``preempt_timeout_s`` + a margin before SIGKILL
    (unless the user set ``RAY_JOB_STOP_WAIT_TIME_S`` in the job's env_vars)."""
    env_vars = runtime_env.setdefault("env_vars", {})
    env_vars.setdefault(STOP_WAIT_VAR, str(int(preempt_timeout_s(overrides)) + STOP_MARGIN_S))
    return runtime_env


def describe(runtime_env: dict[str, Any]) -> str:
    """A one-line summary for the console that never prints env var values (they may be secrets)."""
    parts = [f"working_dir={runtime_env.get('working_dir')}"]
    if "pip" in runtime_env:
        parts.append(f"pip={runtime_env['pip']}")
    if runtime_env.get("env_vars"):
        parts.append("env_vars=" + ",".join(sorted(runtime_env["env_vars"])))
    others = sorted(set(runtime_env) - {"working_dir", "excludes", "pip", "env_vars"})
    parts.extend(others)
    return " ".join(parts)
