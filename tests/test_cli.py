"""``moe-train`` as a user runs it: a subprocess with Hydra overrides."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from moe_trainer.logging import find_offline_runs, read_offline_run
from tests.helpers import tree_state

MOE_TRAIN = str(Path(sys.executable).parent / "moe-train")


def run_command(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A process of this module's, without the developer's W&B key."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_API_KEY"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def moe_train(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_command([MOE_TRAIN, *args], cwd)


def moe_trains_at_once(*commands: tuple[str, ...], cwd: Path) -> list[subprocess.CompletedProcess[str]]:
    """Independent ``moe-train`` commands, each its own process, run side by side: each is mostly one
    interpreter importing (one core), so two take about the time of one on the CI's 2 cores."""
    with ThreadPoolExecutor(max_workers=len(commands)) as pool:
        return list(pool.map(lambda args: moe_train(*args, cwd=cwd), commands))


@dataclass
class Finished:
    proc: subprocess.CompletedProcess[str]
    seconds: float  # from its start to its exit
    cwd: Path  # its own working directory (what a refused start must leave empty)


def _run_timed(command: list[str], cwd: Path) -> Finished:
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    proc = run_command(command, cwd)
    return Finished(proc, time.monotonic() - start, cwd)


# What the console shows during a Ray run (phases, final lines, nothing else; issue 15) is tested on the
# strategy comparison's sweep in tests/test_compare.py: one moe-train of Ray strategies there, not two.

BAD_INPUTS_RUN = "every bad input"  # the batch below, in one interpreter
SHORT = {  # name: moe-train's arguments ({run_dir}: under the command's own working directory), in starting order
    "unreachable cluster": ["experiment=debug", "parallel=expert_parallel", "cluster.address=127.0.0.1:9",
                            "cluster.connect_timeout_s=5", "hydra.run.dir={run_dir}"],
    "cfg job": ["--cfg", "job", "moe.num_experts=16", "parallel.num_actors=3"],
    "console script refusal": ["experiment=debug", "hydra.run.dir={run_dir}", "moe.top_k=9"],
}


@pytest.fixture(scope="module")
def short_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Finished]]]:
    """This module's commands that end before training, started by the first test that reads one: the batch of
    bad inputs (one interpreter, the longest) and, one after the other beside it, three ``moe-train`` starts, each
    in its own working directory. Each is mostly one interpreter importing (one core): two at a time keep the CI's
    2 cores busy, and no more, so the unreachable cluster's time bound still measures its own start."""
    root = tmp_path_factory.mktemp("short")
    commands = {BAD_INPUTS_RUN: ([sys.executable, "-c", ENTRY_POINT_RUNS, json.dumps(bad_input_argv(root / "bad"))],
                                 root / "bad")}
    for name, args in SHORT.items():
        cwd = root / name.replace(" ", "-")
        commands[name] = [MOE_TRAIN, *(a.format(run_dir=cwd / "run") for a in args)], cwd
    pool = ThreadPoolExecutor(max_workers=2)
    yield {name: pool.submit(_run_timed, command, cwd) for name, (command, cwd) in commands.items()}
    pool.shutdown(wait=True, cancel_futures=True)


def test_cfg_job_shows_the_public_settings(short_runs: dict[str, Future[Finished]]) -> None:
    """``--help`` (its option lists: ``parallel: data_parallel, disaggregated, ...``): tests/test_help.py."""
    proc = short_runs["cfg job"].result().proc
    assert proc.returncode == 0, proc.stderr
    assert "num_experts: 16" in proc.stdout and "num_actors: 3" in proc.stdout


BAD_INPUTS = [
    ("moe.top_k=9", "moe.top_k"),
    ("moe.top_k=0", "moe.top_k"),
    ("moe.capacity_factor=0", "moe.capacity_factor"),
    ("moe.num_experts=-1", "moe.num_experts"),
    ("parallel=ring_allreduce", "parallel"),
    ("data.paths=[/nonexistent/corpus.txt]", "data.paths"),
    ("train.max_steps=-5", "train.max_steps"),
    ("moe.topk=2", "moe.topk"),
    ("model.n_heads=5", "model.n_heads"),
    ("data.seq_len=4096", "data.seq_len"),
    ("logger.mode=loud", "logger.mode"),
    ("data.tokenizer=/nonexistent/tokenizer.json", "data.tokenizer"),
    ("data.tokenizer=bpe data.vocab_size=300000", "data.vocab_size"),  # over the embedding cap
    # the command line itself, checked before Hydra runs: one line with the fix, not Hydra's hint
    ("moe.num_expert=4", "moe.num_expert=4: no such setting; did you mean moe.num_experts?"),
    ("+moe.num_expert=4", "+moe.num_expert=4: no such setting; did you mean moe.num_experts?"),
    ("data.paths=/x.txt", "data.paths=/x.txt: data.paths is a list: write data.paths=[/x.txt]"),
    ("data.paths=[~/x.txt]", """'data.paths=["~/x.txt"]'"""),
    ("experiment=debgu", "experiment=debgu: no such option of experiment"),
    ("data.paths=[/nonexistent/*.txt]", "data.paths='/nonexistent/*.txt': the pattern matches no file"),
    ("parallel=expert_parallel parallel.num_actors=3 moe.num_experts=8 train.batch_size=16",
     "try parallel.num_actors=2, or parallel.num_actors=4, or moe.num_experts=9 with train.batch_size=15"),
    ("train.resume=auto", "train.resume"),  # in the default timestamped run dir: see DEFAULT_RUN_DIR
    ("parallel.memory_per_actor_gb=0", "parallel.memory_per_actor_gb=0.0: must be > 0"),
    ("train.init_from=/nonexistent/model", "train.init_from='/nonexistent/model': is not a transformers model "
     "directory"),
]
# run in Hydra's default run dir (outputs/<date>/<time>-<strategy>), not in the case's own
DEFAULT_RUN_DIR = {"train.resume=auto"}


# Every bad input through moe-train's entry point, in one process: the entry point runs once per
# case as the console script would (Hydra parses sys.argv, exits with the code); one interpreter
# start instead of one per case (4-5 s each).
ENTRY_POINT_RUNS = """
import contextlib, io, json, sys
from moe_trainer.cli import main
results = []
for args in json.loads(sys.argv[1]):
    sys.argv, err, code = ["moe-train", *args], io.StringIO(), 0
    with contextlib.redirect_stderr(err):
        try:
            main()
        except SystemExit as exit:
            code = exit.code
    results.append({"code": code, "stderr": err.getvalue()})
print(json.dumps(results))
"""


def bad_input_argv(cwd: Path) -> list[list[str]]:
    """Each bad input's arguments, run dirs under ``cwd``; the last one's run dir exists (made here)."""
    argv = [["experiment=debug", "logger.mode=offline", *override.split()]
            + ([] if override in DEFAULT_RUN_DIR else [f"hydra.run.dir={cwd / 'out' / str(i)}"])
            for i, (override, _) in enumerate(BAD_INPUTS)]
    existing = cwd / "existing"  # a run dir from before: a refused start must leave it as it was
    (existing / ".hydra").mkdir(parents=True)
    (existing / ".hydra" / "overrides.yaml").write_text("- ORIGINAL\n")
    (existing / "summary.json").write_text("{}\n")
    argv.append(["experiment=debug", "logger.mode=offline", f"hydra.run.dir={existing}", "train.resume=auto",
                 "parallel=expert_parallel", "parallel.num_actors=3"])
    return argv


@pytest.fixture(scope="module")
def bad_input_runs(short_runs: dict[str, Future[Finished]]) -> tuple[Path, dict[str, dict[str, Any]]]:
    finished = short_runs[BAD_INPUTS_RUN].result()
    cwd, proc = finished.cwd, finished.proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    cases = [override for override, _ in BAD_INPUTS] + [EXISTING_RUN_DIR]
    return cwd, dict(zip(cases, results, strict=True))


EXISTING_RUN_DIR = "a bad setting for an existing run dir"


def test_a_refused_start_leaves_an_existing_run_dir_as_it_was(
        bad_input_runs: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    cwd, results = bad_input_runs
    result = results[EXISTING_RUN_DIR]
    assert result["code"] == 2 and "parallel.num_actors" in result["stderr"], result["stderr"]
    existing = cwd / "existing"
    assert sorted(p.relative_to(existing).as_posix() for p in existing.rglob("*")) == [
        ".hydra", ".hydra/overrides.yaml", "summary.json"]
    assert (existing / ".hydra" / "overrides.yaml").read_text() == "- ORIGINAL\n"


@pytest.mark.parametrize("override,setting", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_fails_clearly_and_writes_nothing(bad_input_runs: tuple[Path, dict[str, dict[str, Any]]],
                                                    override: str, setting: str) -> None:
    cwd, results = bad_input_runs
    result, run_dir = results[override], cwd / "out" / str([b[0] for b in BAD_INPUTS].index(override))
    assert result["code"] == 2, result["stderr"]
    assert result["stderr"].startswith("moe-train: invalid setting: ") and result["stderr"].count("\n") == 1, \
        result["stderr"]
    assert setting in result["stderr"]
    assert not run_dir.exists(), f"left behind: {list(run_dir.rglob('*'))}"
    assert not (cwd / "wandb").exists() and not (cwd / "outputs").exists()


def test_resume_auto_without_a_fixed_run_dir_is_refused_in_one_line_with_the_fix(
        bad_input_runs: tuple[Path, dict[str, dict[str, Any]]]) -> None:
    result = bad_input_runs[1]["train.resume=auto"]
    assert result["code"] == 2
    assert result["stderr"].count("\n") == 1 and "hydra.run.dir=DIR" in result["stderr"]


@pytest.mark.slow
def test_rerunning_a_finished_run_changes_nothing_and_a_resume_continues_its_wandb_run(tmp_path: Path) -> None:
    run_dir, copy = tmp_path / "run", tmp_path / "copy"
    args = ("experiment=debug", "logger.mode=offline", "train.resume=auto")
    proc = moe_train(*args[:2], f"hydra.run.dir={run_dir}", cwd=tmp_path)  # 6 steps
    assert proc.returncode == 0, proc.stderr
    before = tree_state(run_dir)  # with Hydra's .hydra/*.yaml and its log
    shutil.copytree(run_dir, copy, symlinks=True)
    # the rerun, and the resume of a copy of the same finished run, side by side
    rerun, resumed = moe_trains_at_once((*args, f"hydra.run.dir={run_dir}"),
                                        (*args, f"hydra.run.dir={copy}", "train.max_steps=9"), cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr
    assert rerun.stdout.splitlines() == [f"moe-train: nothing to do: {run_dir} is at step 6, train.max_steps=6; "
                                         "nothing was changed (raise train.max_steps to train further)"]
    assert tree_state(run_dir) == before

    assert resumed.returncode == 0, resumed.stderr
    lines = resumed.stdout.splitlines()
    assert lines[0] == f"resumed from step 6 of {copy} (step_00000006)"
    assert [line for line in lines if line.startswith("done: 9 steps (resumed from step 6), val_loss ")]
    starts = [read_offline_run(r) for r in find_offline_runs(copy / "wandb")]
    assert len(starts) == 2 and starts[0].run_id == starts[1].run_id
    assert starts[1].series("events/resumed_from_step") == [(6, 6)]


def test_the_console_script_exits_2_on_bad_input(short_runs: dict[str, Future[Finished]]) -> None:
    """The installed ``moe-train`` itself (what the batch above calls in-process)."""
    finished = short_runs["console script refusal"].result()
    proc = finished.proc
    assert proc.returncode == 2
    assert "moe.top_k" in proc.stderr and "Traceback" not in proc.stderr
    assert not (finished.cwd / "run").exists()


@pytest.mark.slow
def test_a_glob_and_a_directory_in_data_paths_train(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    entries = (corpus / "*.txt", corpus)
    # two runs, side by side; both tokenise the same files, which the token cache's per-key lock serialises
    procs = moe_trains_at_once(*[("experiment=debug", "train.max_steps=2", f"data.paths=[{entry}]",
                                  f"hydra.run.dir={tmp_path / f'run{i}'}") for i, entry in enumerate(entries)],
                               cwd=tmp_path)
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == str(tmp_path / f"run{i}")


def test_unreachable_cluster_address_fails_fast_with_the_address(short_runs: dict[str, Future[Finished]]) -> None:
    finished = short_runs["unreachable cluster"].result()
    proc = finished.proc
    assert finished.seconds < 30
    assert proc.returncode != 0
    assert "cluster.address" in proc.stderr and "127.0.0.1:9" in proc.stderr
    assert not (finished.cwd / "run").exists()
