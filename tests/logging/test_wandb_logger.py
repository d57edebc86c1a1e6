"""RunLogger against the real wandb (offline, disabled, unreachable online) and the reader.

The offline test writes a real run and reads the transaction log back, so a wandb upgrade that
changes what lands on disk fails here rather than in a report after a long training run.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moe_trainer.config.schema import LoggerConfig
from moe_trainer.logging import (
    STEP_METRIC,
    RunLogger,
    WandbLogFormatError,
    find_offline_runs,
    iter_records,
    read_offline_run,
    resolve_mode,
)

CONFIG = {"model": {"d_model": 64, "n_layers": 2}, "moe": {"top_k": 2}, "train": {"lr": 3e-3}}
LOSSES = {0: 5.5451774444795625, 10: 3.25, 25: 1.0 / 3.0, 40: 0.1 + 0.2}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No real credentials or mode overrides from the developer's shell leak into a test."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT", "WANDB_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def _cfg(mode: str, **kw: object) -> LoggerConfig:
    return LoggerConfig(mode=mode, project="moe-test", group="exp-a", tags=["unit", "moe"], **kw)


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunLogger, Path, float, float]:
    """One offline run shared by the read-back tests (init costs ~0.5 s on first use)."""
    run_dir = tmp_path_factory.mktemp("hydra_run")
    t0 = time.perf_counter()
    logger = RunLogger(_cfg("offline"), run_dir, job_type="train", config=CONFIG, name="tiny-moe")
    init_s = time.perf_counter() - t0
    for step, loss in LOSSES.items():
        logger.log({"train/loss": loss, "train/lr": 1e-3 * (step + 1)}, step=step)
        if step in (10, 40):
            logger.log({"val/loss": loss + 1.0, "val/ppl": math.exp(loss + 1.0)}, step=step)
    logger.log_summary({"best_val_loss": 1.3, "tokens_seen": 123_456_789})
    t0 = time.perf_counter()
    logger.finish()
    finish_s = time.perf_counter() - t0
    return logger, run_dir, init_s, finish_s


def test_offline_run_lives_under_run_dir(offline_run: tuple[RunLogger, Path, float, float]) -> None:
    logger, run_dir, init_s, finish_s = offline_run
    print(f"offline init {init_s:.2f}s finish {finish_s:.2f}s")
    assert logger.mode == "offline"
    path = logger.run_path
    assert path is not None and path.is_dir()
    assert path.parent == run_dir.resolve() / "wandb"
    assert path.name.startswith("offline-run-")
    assert list(path.glob("run-*.wandb"))
    assert logger.sync_command == f"wandb sync {path}"
    assert logger.url is None
    assert find_offline_runs(run_dir) == [path]
    assert not logger.active
    logger.log({"train/loss": 9.0}, step=99)  # after finish: ignored, no error
    logger.finish()  # idempotent


def test_history_summary_config_read_back_exactly(offline_run: tuple[RunLogger, Path, float, float]) -> None:
    logger, run_dir, _, _ = offline_run
    run = read_offline_run(run_dir)  # a Hydra run dir holding one run is enough
    assert run.path == logger.run_path
    assert run.finished and run.exit_code == 0
    assert run.stats.corrupt_chunks == 0 and run.stats.bad_records == 0 and not run.stats.truncated

    assert run.project == "moe-test"
    assert run.group == "exp-a"
    assert run.job_type == "train"
    assert run.name == "tiny-moe"
    assert run.tags == ["unit", "moe"]
    assert run.run_id == logger.run_id
    assert run.config == CONFIG
    assert run.metric_step == {"*": STEP_METRIC}

    train = run.series("train/loss")
    assert train == list(LOSSES.items())  # bit-exact floats, in order, at the right steps
    assert run.series("train/lr") == [(s, 1e-3 * (s + 1)) for s in LOSSES]
    assert run.series("val/loss") == [(10, 4.25), (40, 0.1 + 0.2 + 1.0)]
    assert len(run.history) == len(LOSSES) + 2  # one row per log call
    assert [row["_step"] for row in run.history] == list(range(len(run.history)))
    merged = run.rows_by_step()
    assert sorted(merged) == sorted(LOSSES)
    assert merged[40]["train/loss"] == LOSSES[40] and merged[40]["val/ppl"] == math.exp(LOSSES[40] + 1.0)
    assert run.metric_keys() == sorted([STEP_METRIC, "train/loss", "train/lr", "val/loss", "val/ppl"])

    assert run.summary["best_val_loss"] == 1.3
    assert run.summary["tokens_seen"] == 123_456_789
    assert run.summary["train/loss"] == LOSSES[40]  # wandb's "last value" summary
    assert run.summary[STEP_METRIC] == 40


def test_reader_accepts_file_and_run_dir(offline_run: tuple[RunLogger, Path, float, float]) -> None:
    logger, _, _, _ = offline_run
    assert logger.run_path is not None
    log_file = next(logger.run_path.glob("run-*.wandb"))
    assert read_offline_run(log_file).history == read_offline_run(logger.run_path).history


def test_reader_survives_truncation_and_rejects_foreign_files(
    offline_run: tuple[RunLogger, Path, float, float], tmp_path: Path
) -> None:
    logger, _, _, _ = offline_run
    assert logger.run_path is not None
    data = next(logger.run_path.glob("run-*.wandb")).read_bytes()
    run_dir = tmp_path / "offline-run-20000101_000000-cut"
    run_dir.mkdir()
    (run_dir / "run-cut.wandb").write_bytes(data[: len(data) - 20])  # killed mid-write
    run = read_offline_run(run_dir)
    assert run.stats.truncated and not run.finished
    assert run.series("train/loss") == list(LOSSES.items())  # everything before the cut survives

    bad = tmp_path / "bad.wandb"
    bad.write_bytes(b"not a wandb file at all")
    with pytest.raises(WandbLogFormatError):
        list(iter_records(bad))


def test_reader_reassembles_records_split_across_blocks(tmp_path: Path) -> None:
    """A config bigger than a 32 KiB block is written as FIRST/MIDDLE/LAST fragments."""
    big = {"vocab": [f"tok{i}" for i in range(12_000)]}  # ~110 KB of JSON
    logger = RunLogger(_cfg("offline"), tmp_path, job_type="train", config=big)
    logger.log({"train/loss": 0.5}, step=3)
    logger.finish()
    run = read_offline_run(tmp_path)
    assert run.config == big
    assert run.series("train/loss") == [(3, 0.5)]
    assert run.stats.corrupt_chunks == 0


def test_reader_skips_a_corrupt_block(tmp_path: Path) -> None:
    """Flipping a byte in a chunk loses that block only; the file stays readable."""
    logger = RunLogger(_cfg("offline"), tmp_path / "src", job_type="train", config={"k": "v" * 40_000})
    for step in range(5):
        logger.log({"train/loss": float(step)}, step=step)
    logger.finish()
    assert logger.run_path is not None
    data = bytearray(next(logger.run_path.glob("run-*.wandb")).read_bytes())
    assert len(data) > 32768  # the big config pushes the history into the second block
    data[100] ^= 0xFF  # inside the first block, which holds the start of the run record
    run_dir = tmp_path / "offline-run-20000101_000000-bad"
    run_dir.mkdir()
    (run_dir / "run-bad.wandb").write_bytes(bytes(data))
    run = read_offline_run(run_dir)
    assert run.stats.corrupt_chunks >= 1
    assert run.series("train/loss") == [(s, float(s)) for s in range(5)]


def test_reader_falls_back_to_summary_and_config_files(tmp_path: Path) -> None:
    """Runs synced elsewhere may come as ``files/`` only: summary and config, no history."""
    files = tmp_path / "run-20000101_000000-abc" / "files"
    files.mkdir(parents=True)
    (files / "wandb-summary.json").write_text('{"train/loss": 0.5, "_step": 9}')
    (files / "config.yaml").write_text(
        "wandb_version: 1\n_wandb:\n  value: {}\nmoe:\n  desc: null\n  value:\n    top_k: 2\n"
    )
    run = read_offline_run(files.parent)
    assert run.source == "files" and run.history == []
    assert run.summary == {"train/loss": 0.5, "_step": 9}
    assert run.config == {"moe": {"top_k": 2}}


def test_omegaconf_config_is_resolved(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"experiment": "e1", "logger": {"group": "${experiment}"}})
    logger = RunLogger(_cfg("offline"), tmp_path, job_type="train", config=cfg)
    logger.finish()
    assert read_offline_run(tmp_path).config == {"experiment": "e1", "logger": {"group": "e1"}}


def test_disabled_writes_nothing(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    logger = RunLogger(_cfg("disabled"), run_dir, job_type="train", config=CONFIG)
    logger.log({"train/loss": 1.0}, step=0)
    logger.log_summary({"x": 1})
    logger.finish()
    assert not logger.active
    assert logger.run_path is None and logger.sync_command is None
    assert not run_dir.exists()
    assert list(tmp_path.iterdir()) == []


def test_resolve_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_mode("auto") == "offline"  # no key anywhere (fixture removed it)
    for mode in ("online", "offline", "disabled"):
        assert resolve_mode(mode) == mode
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_mode("auto") == "online"
    assert resolve_mode("offline") == "offline"  # explicit config beats the key
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_mode("auto") == "disabled"  # explicit env mode beats the key
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline"
    with pytest.raises(ValueError):
        resolve_mode("cloud")


def test_resolve_mode_reads_netrc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    netrc_file = tmp_path / "netrc"
    netrc_file.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc_file.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc_file))
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert resolve_mode("auto") == "offline"  # the key is for another server


def test_auto_without_key_logs_offline(tmp_path: Path) -> None:
    logger = RunLogger(_cfg("auto"), tmp_path, job_type="eval", config={})
    logger.log({"val/loss": 2.0}, step=7)
    logger.finish()
    assert logger.mode == "offline"
    run = read_offline_run(tmp_path)
    assert run.job_type == "eval"
    assert run.series("val/loss") == [(7, 2.0)]


def test_a_run_id_continues_that_run(tmp_path: Path) -> None:
    """Offline, each start is its own ``offline-run-*-<id>`` directory; ``wandb sync`` joins them into one run."""
    # two run dirs: a start's directory is named by its second, and these two start within one
    first = RunLogger(_cfg("offline"), tmp_path / "a", job_type="train", config={})
    first.log({"train/loss": 2.0}, step=3)
    first.finish()
    second = RunLogger(_cfg("offline"), tmp_path / "b", job_type="train", config={}, run_id=first.run_id)
    second.log({"train/loss": 1.0}, step=4)
    second.finish()
    runs = [read_offline_run(path) for path in find_offline_runs(tmp_path)]
    assert [run.run_id for run in runs] == [first.run_id, first.run_id]
    assert [run.series("train/loss") for run in runs] == [[(3, 2.0)], [(4, 1.0)]]


@pytest.mark.timeout(60)
def test_online_without_network_degrades_to_noop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unreachable server: init gives up after init_timeout, warns once, training goes on."""
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # refused at once, no DNS wait
    t0 = time.perf_counter()
    logger = RunLogger(_cfg("online"), tmp_path, job_type="train", config=CONFIG, init_timeout=3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 20, elapsed
    assert logger.mode == "disabled" and not logger.active
    for step in range(3):
        logger.log({"train/loss": 1.0}, step=step)
    logger.log_summary({"best": 1.0})
    logger.finish()
    assert logger.run_path is None and logger.url is None


@pytest.mark.timeout(60)
def test_auto_with_dead_server_falls_back_to_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    logger = RunLogger(_cfg("auto"), tmp_path, job_type="train", config=CONFIG, init_timeout=3)
    assert logger.mode == "offline"
    logger.log({"train/loss": 0.25}, step=1)
    logger.finish()
    assert read_offline_run(tmp_path).series("train/loss") == [(1, 0.25)]


@pytest.mark.timeout(60)
def test_init_failure_prints_one_warning_line(tmp_path: Path) -> None:
    """In a fresh process, so the stderr captured is exactly what a training job would show."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from moe_trainer.config.schema import LoggerConfig\n"
        "from moe_trainer.logging import RunLogger\n"
        "lg = RunLogger(LoggerConfig(mode='online'), Path(sys.argv[1]), 'train', {}, init_timeout=3)\n"
        "lg.log({'a': 1.0}, step=0); lg.log({'a': 2.0}, step=1); lg.finish()\n"
        "print('still training')\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "WANDB_API_KEY": "0" * 40,
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=env,
        timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "still training"
    ours = [line for line in proc.stderr.splitlines() if "[moe_trainer]" in line]
    assert len(ours) == 1 and "continuing without W&B logging" in ours[0], proc.stderr


def test_the_upload_command_names_every_start_of_the_run_and_no_other(
        offline_run: tuple[RunLogger, Path, float, float]) -> None:
    """A resumed run's starts share the id; two starts in one second get a ``-1`` suffix from W&B."""
    logger, _, _, _ = offline_run
    path = logger.run_path
    assert path is not None
    same_second = path.with_name(path.name + "-1")
    earlier = path.with_name(f"offline-run-20000101_000000-{logger.run_id}")
    other_run = path.with_name("offline-run-20000101_000000-zzzzzzzz")
    try:
        for d in (same_second, earlier, other_run):
            d.mkdir()
        assert logger.sync_command == f"wandb sync {earlier} {path} {same_second}"
    finally:
        for d in (same_second, earlier, other_run):
            d.rmdir()
