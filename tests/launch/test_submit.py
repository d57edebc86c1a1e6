"""``moe-submit`` against a real Ray cluster started as its own processes, as a user would start one.

The session's two-node cluster (``two_nodes``: a head on 127.0.0.3 and a node on 127.0.0.2)
runs with token authentication and its own token (``RAY_AUTH_TOKEN`` in the nodes'
environment, the way KubeRay and cluster configs pass it), so the tests never depend on or
touch ``~/.ray/auth_token``: ``moe-submit`` runs with ``HOME`` pointing at a directory
holding that token in ``.ray/auth_token``, the default place Ray reads.
The jobs run on this machine, so an absolute ``hydra.run.dir`` lets the tests read the
run's files.
"""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from launch import address as addr
from launch import auth
from launch import runtime_env as renv
from launch.jobs import failure_report, outcome
from launch.submit import _submit_parser, entrypoint, main, program_for
from tests.conftest import TwoNodeCluster
from tests.helpers import read_records, train_run
from tests.ray_nodes import RayNode, clean_env, free_ports

BIN = Path(sys.executable).parent
MOE_SUBMIT = str(BIN / "moe-submit")


# ---------------------------------------------------------------- fast unit tests (no Ray)


def test_entrypoint_quotes_overrides_for_the_shell() -> None:
    command = entrypoint(["experiment=debug", "data.paths=[/a b/x.txt,/c.txt]", "logger.tags=[x]"])
    assert command == "moe-train experiment=debug 'data.paths=[/a b/x.txt,/c.txt]' 'logger.tags=[x]'"
    remote, local = addr.Address("http://head:8265", "--address"), addr.Address("http://127.0.0.1:8265", "default")
    assert program_for("auto", remote) == "moe-train" and program_for("none", local) == "moe-train"
    assert program_for("/opt/my venv/bin", remote) == "'/opt/my venv/bin/moe-train'"
    fallback = program_for("auto", local)  # a port-forward to a remote head looks local too: PATH first
    assert fallback.startswith('"$(command -v moe-train || echo ') and str(BIN / "moe-train") in fallback
    assert subprocess.run(["sh", "-c", f"echo {fallback}"], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin"}).stdout.strip() == str(BIN / "moe-train")


def test_address_resolution_and_normalisation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert addr.resolve(None) == addr.Address("http://127.0.0.1:8265", "default")
    monkeypatch.setenv("RAY_ADDRESS", "head:8265/")
    assert addr.resolve(None) == addr.Address("http://head:8265", "RAY_ADDRESS")
    assert addr.resolve("https://x:443").url == "https://x:443"
    with pytest.raises(addr.AddressError, match="Ray Client address"):
        addr.normalize("ray://head:10001")


def test_token_lookup_follows_rays_precedence(tmp_path: Path) -> None:
    default = tmp_path / "auth_token"
    default.write_text("from-default\n")
    path_file = tmp_path / "other"
    path_file.write_text("from-path")
    assert auth.find_token({}, default) == auth.Token("from-default", str(default))
    assert auth.find_token({"RAY_AUTH_TOKEN_PATH": str(path_file)}, default).value == "from-path"
    both = {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path_file)}
    assert auth.find_token(both, default).value == "from-env"
    assert auth.find_token({}, tmp_path / "missing") is None
    with pytest.raises(auth.AuthError, match="cannot be read"):
        auth.find_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "missing")}, default)


def test_token_is_sent_only_to_servers_that_want_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN", "t0k")
    assert auth.headers_for("disabled", "http://h:8265") == ({}, None)
    headers, token = auth.headers_for("token", "http://h:8265")
    assert headers == {"Authorization": "Bearer t0k"} and token.source == "RAY_AUTH_TOKEN"
    assert auth.headers_for(None, "http://h:8265")[0] == headers  # an old server that cannot say: try the token
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    assert auth.headers_for(None, "http://h:8265") == ({}, None)
    with pytest.raises(auth.AuthError, match="requires token authentication"):
        auth.headers_for("token", "http://h:8265")


def test_runtime_env_defaults_and_passthrough() -> None:
    root = renv.check_working_dir(renv.project_root())
    env = renv.build(root, pip=["wandb==0.31.0"], env_vars={"A": "1"},
                     extra_json='{"env_vars": {"NCCL_DEBUG": "INFO"}, "excludes": ["data/"], '
                                '"py_executable": "/opt/venv/bin/python"}')
    assert env["working_dir"] == str(root)
    assert {".git", ".venv", "outputs", "multirun", "wandb", "benchmarks/results", "data/"} <= set(env["excludes"])
    assert env["pip"] == ["wandb==0.31.0"]
    assert env["env_vars"] == {"A": "1", "NCCL_DEBUG": "INFO"}
    assert env["py_executable"] == "/opt/venv/bin/python"
    assert "INFO" not in renv.describe(env)  # values (maybe secrets) are never printed
    assert renv.parse_env(["X=1", "K"], {"K": "secret"}) == {"X": "1", "K": "secret"}
    # a stopped job gets its preemption bound (and a margin) before Ray's SIGKILL; a value the user set is kept
    stop_wait = renv.STOP_WAIT_VAR
    assert renv.with_stop_grace({}, ["fault_tolerance.preempt_timeout_s=60"])["env_vars"][stop_wait] == "90"
    assert renv.with_stop_grace({}, [])["env_vars"][stop_wait] == "150"
    assert renv.with_stop_grace({"env_vars": {stop_wait: "7"}}, [])["env_vars"][stop_wait] == "7"
    with pytest.raises(renv.RuntimeEnvError, match="not set"):
        renv.parse_env(["MISSING_VAR"], {})
    with pytest.raises(renv.RuntimeEnvError, match="not the moe-trainer project"):
        renv.check_working_dir(Path(tempfile.gettempdir()))


def test_outcome_maps_job_status_to_exit_code_and_explains_failures() -> None:
    @dataclass
    class Info:
        status: str
        message: str | None = None
        driver_exit_code: int | None = None

    assert outcome(Info("SUCCEEDED")) == 0
    assert outcome(Info("FAILED")) == 1
    assert outcome(Info("STOPPED")) == 1
    log_tail = "\n".join(f"line {i}" for i in range(30))
    report = failure_report(Info("FAILED", f"Job entrypoint command failed with exit code 2\n{log_tail}", 2), "j1")
    assert report[0] == "job j1 FAILED (moe-train exit code 2)"
    assert "failed with exit code 2" in report[1] and report[-1].strip() == "line 29" and len(report) == 13
    missing = failure_report(Info("FAILED", "sh: 1: moe-train: not found", 127), "j2")
    assert "not installed on the head node" in missing[1]


def test_unreachable_address_fails_fast_with_the_address(capsys: pytest.CaptureFixture[str]) -> None:
    port = free_ports(1)[0]  # nothing listens there
    start = time.monotonic()
    assert main(["--address", f"127.0.0.1:{port}", "experiment=debug"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "8265" in err


def test_silent_address_fails_within_its_timeout(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts connections but never answers (a firewall, a hung proxy): ``--timeout`` (10 s unless
    given) bounds the wait; 2 s here."""
    assert _submit_parser().parse_args(["experiment=debug"]).timeout == 10
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        start = time.monotonic()
        assert main(["--address", f"http://127.0.0.1:{port}", "--timeout", "2", "experiment=debug"]) == 2
        assert time.monotonic() - start < 10
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "within" in err


# ---------------------------------------------------------------- a real Ray cluster


@pytest.fixture
def head(two_nodes: TwoNodeCluster) -> RayNode:
    """The head of the session's two-node cluster (127.0.0.3; ``tests/ray_nodes.py``), as a user starts one."""
    two_nodes.ensure_worker()
    return two_nodes.head


def _client_env(head: RayNode, **extra: str) -> dict[str, str]:
    """A user's shell: no Ray settings at all, the token only in ~/.ray/auth_token."""
    return clean_env(**{"HOME": str(head.home), **extra})  # a test may give another HOME


def _moe_submit(head: RayNode, *args: str, timeout: float = 540, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MOE_SUBMIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=_client_env(head, **env))


def _training(metrics: Path) -> bool:
    """Whether the run's ``metrics.jsonl`` holds a training record yet."""
    return metrics.exists() and '"loss"' in metrics.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_job_exits_non_zero_with_its_error(head: RayNode, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _moe_submit(head, "--address", head.url, "experiment=debug", "moe.top_k=99",
                         f"hydra.run.dir={run_dir}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr and "exit code 2" in result.stderr
    assert "moe.top_k=99" in result.stderr  # the job's message, not only the streamed logs
    assert not run_dir.exists()  # moe-train refused the setting before writing anything


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_token_problems_are_explained(head: RayNode, tmp_path: Path) -> None:
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    result = _moe_submit(head, "--address", head.url, "experiment=debug", HOME=str(empty_home), timeout=60)
    assert result.returncode == 2
    assert "requires token authentication" in result.stderr
    assert "RAY_AUTH_TOKEN" in result.stderr and "~/.ray/auth_token" in result.stderr
    result = _moe_submit(head, "--address", head.url, "experiment=debug", RAY_AUTH_TOKEN="not-the-token",
                         timeout=60)
    assert result.returncode == 2
    assert "refused the token from RAY_AUTH_TOKEN" in result.stderr


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_gcs_address_is_recognised_as_the_wrong_port(head: RayNode) -> None:
    result = _moe_submit(head, "--address", head.gcs, "experiment=debug", timeout=40)
    assert result.returncode == 2
    assert head.gcs in result.stderr and "8265" in result.stderr


def _status(head: RayNode, job_id: str, missing_ok: bool = False) -> str:
    result = _moe_submit(head, "status", job_id, "--address", head.url, timeout=60)
    if missing_ok and result.returncode == 2 and "no job" in result.stderr:
        return ""
    assert result.returncode == 0, result.stderr
    return result.stdout


def _wait_status(head: RayNode, job_id: str, wanted: str, timeout_s: float = 240) -> str:
    """Polls ``moe-submit status``; the job may not exist yet when its submitter is still starting."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        out = _status(head, job_id, missing_ok=True)
        if f"{job_id}: {wanted}" in out:
            return out
        time.sleep(1)
    raise AssertionError(f"{job_id} never reached {wanted}: {out}")


STEPS = 96  # the stop lands at step 14-21 on this idle 2-core machine, and past 48 under load (a job that ends first
# has nothing to stop)
PREEMPTED_RUN = ["experiment=debug", "parallel=expert_parallel", "parallel.num_actors=2", "parallel.cpus_per_actor=0.5",
                 f"train.max_steps={STEPS}", "train.log_every=1", f"train.eval_every={STEPS}",
                 "train.checkpoint_every=0", "moe.num_experts=8", "fault_tolerance.preempt_timeout_s=60"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_stopped_job_saves_and_its_no_wait_resubmission_continues_with_its_overrides(
        head: RayNode, ray_cluster: object, tmp_path: Path) -> None:
    # a followed expert_parallel job stopped while it trains (a preemption): SIGTERM to its driver, which saves a
    # checkpoint at the next step boundary before Ray's SIGKILL; stop reports STOPPED, the follower exits 1
    run_dir, job_id = tmp_path / "run", f"moe-test-{secrets.token_hex(4)}"
    # the uninterrupted reference (compared at the end) trains in this process meanwhile, while the jobs mostly
    # wait on Ray Jobs and their start-up: single, which computes what expert_parallel computes (to float
    # rounding) without two more actors to start on this machine's two cores
    pool = ThreadPoolExecutor(max_workers=1)
    reference = pool.submit(train_run, tmp_path / "ref",
                            *[o for o in PREEMPTED_RUN[1:] if not o.startswith("parallel")], "logger.mode=disabled")
    start = time.monotonic()
    follower = subprocess.Popen(
        [MOE_SUBMIT, "--address", head.url, "--job-id", job_id, "--", *PREEMPTED_RUN, f"hydra.run.dir={run_dir}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_client_env(head))
    try:
        deadline = time.monotonic() + 240
        while not _training(run_dir / "metrics.jsonl") and time.monotonic() < deadline:
            time.sleep(0.02)
        first_step = time.monotonic() - start
        stopped = _moe_submit(head, "stop", job_id, "--address", head.url, timeout=120)
        assert stopped.returncode == 0, stopped.stderr
        assert f"{job_id}: STOPPED" in stopped.stdout
        out, err = follower.communicate(timeout=120)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert follower.returncode == 1, out[-2000:] + err[-2000:]
    assert out.splitlines()[0] == job_id
    assert f"job {job_id} STOPPED" in err
    assert "STOPPED" in _status(head, job_id)
    records = read_records(run_dir)
    (event,) = [r for r in records if "preempted" in r]
    last_step = max(r["step"] for r in records if "loss" in r)
    assert event["step"] == last_step < STEPS  # every step the run finished is in the checkpoint: none lost
    assert f"preempted (SIGTERM) at step {last_step}: checkpoint" in out  # the job's own output was streamed
    assert event["preempt_exit_s"] < 60
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == [f"step_{last_step:08d}"]  # complete, and nothing half-written beside it
    print(f"\nmoe-submit expert_parallel (2 actors): submit -> first step record {first_step:.1f} s; preempted at "
          f"step {last_step}: checkpoint saved in {event['preempt_save_time_s']:.2f} s, "
          f"{event['preempt_exit_s']:.2f} s after SIGTERM")

    # resubmitted with --no-wait (the id alone on stdout, exit 0 at once), it continues from that checkpoint
    again = _moe_submit(head, "--no-wait", "--address", head.url, "--", *PREEMPTED_RUN, "train.resume=auto",
                        f"hydra.run.dir={run_dir}", timeout=120)
    assert again.returncode == 0, again.stderr
    again_id = again.stdout.strip()
    assert again_id.startswith("raysubmit_")
    assert "SUCCEEDED" in _wait_status(head, again_id, "SUCCEEDED")
    logs = _moe_submit(head, "logs", again_id, "--address", head.url, timeout=60)
    assert f"done: {STEPS} steps (resumed from step {last_step})" in logs.stdout
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["parallel"]["strategy"] == "expert_parallel"
    assert config["parallel"]["num_actors"] == 2 and config["parallel"]["cpus_per_actor"] == 0.5
    assert config["moe"]["num_experts"] == 8 and config["train"]["resume"] == "auto"
    # the job's actors ran on the cluster it was submitted to (RAY_ADDRESS set by Ray Jobs), not an embedded one
    summary = json.loads((run_dir / "processes.json").read_text())
    assert summary["cluster"] == head.gcs and summary["processes"] == 2
    records = read_records(run_dir)
    assert all(len(layer["tokens_per_expert"]) == 8 for r in records if "loss" in r for layer in r["layers"])
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_step"] == last_step
    # and draws the loss curve an uninterrupted run draws
    resumed = {r["step"]: r["loss"] for r in records if "loss" in r and r["step"] > last_step}
    assert sorted(resumed) == list(range(last_step + 1, STEPS + 1))
    uninterrupted = reference.result().losses
    pool.shutdown()
    assert resumed == pytest.approx({step: uninterrupted[step] for step in resumed}, rel=1e-5)

    unknown = _moe_submit(head, "status", "raysubmit_doesnotexist", "--address", head.url, timeout=60)
    assert unknown.returncode == 2 and "no job raysubmit_doesnotexist" in unknown.stderr
