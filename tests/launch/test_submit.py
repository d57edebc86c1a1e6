"""``moe-submit`` against a real Ray head started as its own process, as a user would start one.

The head runs on 127.0.0.1 with token authentication and its own token (``RAY_AUTH_TOKEN``
in the head's environment, the way KubeRay and cluster configs pass it), so the tests
never depend on or touch ``~/.ray/auth_token``: ``moe-submit`` runs with ``HOME`` pointing
at a directory holding that token in ``.ray/auth_token``, the default place Ray reads.
The jobs run on this machine, so an absolute ``hydra.run.dir`` lets the tests read the
run's files.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from launch import address as addr
from launch import auth
from launch import runtime_env as renv
from launch.jobs import failure_report, outcome
from launch.submit import entrypoint, main, program_for
from tests.helpers import read_records

BIN = Path(sys.executable).parent
MOE_SUBMIT = str(BIN / "moe-submit")
HEAD_START_TIMEOUT_S = 120.0


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
    port = _free_ports(1)[0]  # nothing listens there
    start = time.monotonic()
    assert main(["--address", f"127.0.0.1:{port}", "experiment=debug"]) == 2
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "8265" in err


@pytest.mark.slow
def test_silent_address_fails_within_30_s(capsys: pytest.CaptureFixture[str]) -> None:
    """A port that accepts connections but never answers (a firewall, a hung proxy) with the default timeout."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        start = time.monotonic()
        assert main(["--address", f"http://127.0.0.1:{port}", "experiment=debug"]) == 2
        assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert f"http://127.0.0.1:{port}" in err and "within" in err


# ---------------------------------------------------------------- a real Ray head


@dataclass(frozen=True)
class Head:
    url: str
    gcs: str
    token: str
    home: Path  # holds .ray/auth_token for moe-submit


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _wait_for_job_server(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + HEAD_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=2) as response:
                if json.loads(response.read()).get("authentication_mode") == "token":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"job server at {url} silent for {HEAD_START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


def _alive_in_group(pgid: int) -> list[int]:
    """Live members of a process group; zombies (reaped later by init) do not count."""
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if os.getpgid(p.info["pid"]) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.info["pid"])
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the head's process group (ours alone: it was started in a new session), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()  # reap the leader
            if not _alive_in_group(proc.pid):
                return
            time.sleep(0.2)


@pytest.fixture(scope="module")
def head() -> Iterator[Head]:
    """``ray start --head --block`` in its own session on 127.0.0.1, every port chosen free (others run Ray too)."""
    temp = Path(tempfile.mkdtemp(prefix="rh", dir="/tmp"))  # short: Ray's unix sockets live under it
    gcs, dashboard, agent, client, metrics = _free_ports(5)
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env.update({
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
        # `ray start` replaces --node-ip-address=127.0.0.1 by the machine's routable IP unless this is 0
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "WANDB_MODE": "offline",
    })
    log = temp / "head.log"
    command = [str(BIN / "ray"), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
               f"--metrics-export-port={metrics}", "--num-cpus=4", f"--temp-dir={temp}", "--disable-usage-stats",
               "--block"]
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=temp,
                                start_new_session=True)
    home = temp / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text(token)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        _wait_for_job_server(url, proc, log)
        yield Head(url=url, gcs=f"127.0.0.1:{gcs}", token=token, home=home)
    finally:
        _stop_group(proc)
        shutil.rmtree(temp, ignore_errors=True)


def _client_env(head: Head, **extra: str) -> dict[str, str]:
    """A user's shell: no Ray settings at all, the token only in ~/.ray/auth_token."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "WANDB_"))}
    env["HOME"] = str(head.home)
    env.update(extra)
    return env


def _moe_submit(head: Head, *args: str, timeout: float = 540, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MOE_SUBMIT, *args], capture_output=True, text=True, timeout=timeout,
                          env=_client_env(head, **env))


def _first_step_time(metrics: Path, stop: threading.Event, found: list[float]) -> None:
    """Notes when the first training record (one with ``loss``) appears in ``metrics.jsonl``."""
    while not stop.is_set():
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                if '"loss"' in line:
                    found.append(time.monotonic())
                    return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_expert_parallel_job_runs_on_the_cluster_with_overrides(head: Head, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first_step: list[float] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_first_step_time, args=(run_dir / "metrics.jsonl", stop, first_step),
                               daemon=True)
    watcher.start()
    start = time.monotonic()
    result = _moe_submit(head, "--address", head.url, "--", "experiment=debug", "parallel=expert_parallel",
                         "parallel.num_actors=2", "parallel.cpus_per_actor=0.5", "train.max_steps=3",
                         "moe.num_experts=8", f"hydra.run.dir={run_dir}")
    total = time.monotonic() - start
    stop.set()
    watcher.join(timeout=5)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    job_id = result.stdout.splitlines()[0].strip()
    assert job_id.startswith("raysubmit_")
    assert "SUCCEEDED" in result.stderr
    assert "done: 3 steps" in result.stdout  # the job's own output was streamed

    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["parallel"]["strategy"] == "expert_parallel"
    assert config["parallel"]["num_actors"] == 2 and config["parallel"]["cpus_per_actor"] == 0.5
    assert config["moe"]["num_experts"] == 8 and config["train"]["max_steps"] == 3
    records = read_records(run_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(len(layer["tokens_per_expert"]) == 8 for layer in steps[0]["layers"])
    # the job's actors ran on the cluster it was submitted to (RAY_ADDRESS set by Ray Jobs), not an embedded one
    processes = json.loads((run_dir / "processes.json").read_text())
    assert processes["cluster"] == head.gcs and processes["processes"] == 2
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3
    if first_step:
        print(f"\nmoe-submit expert_parallel (2 actors): submit -> first step record "
              f"{first_step[0] - start:.1f} s (moe-train's own time_to_first_step_s "
              f"{summary.get('time_to_first_step_s', float('nan')):.1f} s, actor join "
              f"{summary.get('actor_join_time_s', float('nan')):.1f} s), submit -> exit {total:.1f} s")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_failing_job_exits_non_zero_with_its_error(head: Head, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    result = _moe_submit(head, "--address", head.url, "experiment=debug", "moe.top_k=99",
                         f"hydra.run.dir={run_dir}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "FAILED" in result.stderr and "exit code 2" in result.stderr
    assert "moe.top_k=99" in result.stderr  # the job's message, not only the streamed logs
    assert not run_dir.exists()  # moe-train refused the setting before writing anything


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_token_problems_are_explained(head: Head, tmp_path: Path) -> None:
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
def test_gcs_address_is_recognised_as_the_wrong_port(head: Head) -> None:
    result = _moe_submit(head, "--address", head.gcs, "experiment=debug", timeout=40)
    assert result.returncode == 2
    assert head.gcs in result.stderr and "8265" in result.stderr


def _status(head: Head, job_id: str, missing_ok: bool = False) -> str:
    result = _moe_submit(head, "status", job_id, "--address", head.url, timeout=60)
    if missing_ok and result.returncode == 2 and "no job" in result.stderr:
        return ""
    assert result.returncode == 0, result.stderr
    return result.stdout


def _wait_status(head: Head, job_id: str, wanted: str, timeout_s: float = 240) -> str:
    """Polls ``moe-submit status``; the job may not exist yet when its submitter is still starting."""
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        out = _status(head, job_id, missing_ok=True)
        if f"{job_id}: {wanted}" in out:
            return out
        time.sleep(1)
    raise AssertionError(f"{job_id} never reached {wanted}: {out}")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_no_wait_status_and_stop(head: Head, tmp_path: Path) -> None:
    # --no-wait: the id alone on stdout, exit 0 at once; the job then finishes by itself
    result = _moe_submit(head, "--no-wait", "--address", head.url, "experiment=debug", "train.max_steps=2",
                         f"hydra.run.dir={tmp_path / 'short'}", timeout=120)
    assert result.returncode == 0, result.stderr
    short_id = result.stdout.strip()
    assert short_id.startswith("raysubmit_")
    assert "SUCCEEDED" in _wait_status(head, short_id, "SUCCEEDED")

    # a followed job stopped from elsewhere: stop reports STOPPED, the follower exits 1
    job_id = f"moe-test-{secrets.token_hex(4)}"
    follower = subprocess.Popen(
        [MOE_SUBMIT, "--address", head.url, "--job-id", job_id, "experiment=debug", "train.max_steps=1000000",
         f"hydra.run.dir={tmp_path / 'long'}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_client_env(head))
    try:
        _wait_status(head, job_id, "RUNNING")
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
    unknown = _moe_submit(head, "status", "raysubmit_doesnotexist", "--address", head.url, timeout=60)
    assert unknown.returncode == 2 and "no job raysubmit_doesnotexist" in unknown.stderr
