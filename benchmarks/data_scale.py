"""Data at scale: token-cache preparation rate and per-actor peak RSS while training, cache vs in memory.

Needs a large corpus of real text (``benchmarks/debian_corpus.py`` builds ~600 MB from Debian
documentation packages). Runs, one after the other (never side by side, so each has the
machine):

1. ``moe-prepare-data`` into a fresh cache directory: wall time, MB of text per second, tokens,
   the preparing process's peak RSS;
2. the same command again: it must find the cache (nothing tokenised);
3. ``moe-train`` with ``expert_parallel`` (2 actors, the pre-2026-12-04 default model:
   ``benchmarks.common.OLD_DEFAULT``, before the extra overrides) on a fresh cache twice: the
   first start's actors build it (one tokenises, the other waits), the second must only map
   it: every actor's peak RSS (``mem_peak_rss_mb``, the process's ``VmHWM``);
4. the same run with ``data.token_cache=null`` (tokenised into memory in every actor, the
   loader before the cache), unless ``--skip-in-memory``.

Usage::

    python -m benchmarks.data_scale --paths '/tmp/debian_corpus/*.jsonl' --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import OLD_DEFAULT, print_table, write_json

BIN = Path(sys.executable).parent


class Failed(RuntimeError):
    """A measured command exited non-zero (the in-memory loader can be killed for memory)."""


def _timed(cmd: list[str], log: Path) -> tuple[float, float, str]:
    """Runs `cmd`; returns (wall seconds, peak RSS of its largest process in MiB, its output)."""
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    text = log.read_text()
    if os.waitstatus_to_exitcode(status) != 0:
        raise Failed(next((line for line in text.splitlines() if "memory used" in line), text.strip()[-300:]))
    return wall, usage.ru_maxrss / 1024, text


def _corpus_bytes(pattern: str) -> int:
    from moe_trainer.data.paths import expand_data_paths

    return sum(os.path.getsize(f) for f in expand_data_paths([pattern]))


def prepare(paths: str, cache: Path, work: Path, label: str) -> dict[str, Any]:
    wall, peak, text = _timed([str(BIN / "moe-prepare-data"), "--cache", str(cache), "data=files",
                               f"data.paths=[{paths}]"], work / f"{label}.log")
    tokens = sum(int(n.replace(",", "")) for n in
                 next(line for line in text.splitlines() if line.startswith("tokens:")).split()[2:5:2])
    return {"run": label, "wall_s": wall, "peak_rss_mb": peak, "tokens": tokens,
            "tokenised": "nothing to do" not in text}


def train(paths: str, cache: str, work: Path, label: str, steps: int, overrides: list[str]) -> dict[str, Any]:
    run_dir = work / label
    shutil.rmtree(run_dir, ignore_errors=True)
    wall, _, text = _timed([str(BIN / "moe-train"), *OLD_DEFAULT, "parallel=expert_parallel", "data=files",
                            f"data.paths=[{paths}]", f"data.token_cache={cache}", f"train.max_steps={steps}",
                            f"train.log_every={steps}", f"train.eval_every={steps}", "train.checkpoint_every=0",
                            "logger.mode=disabled", "logger.progress=false", f"hydra.run.dir={run_dir}", *overrides],
                           work / f"{label}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "mem_peak_rss_mb_per_rank" in r][-1]
    return {"run": label, "wall_s": wall, "actor_peak_rss_mb": last["mem_peak_rss_mb_per_rank"],
            "max_actor_peak_rss_mb": max(last["mem_peak_rss_mb_per_rank"]),
            "tokenised": "Tokenising" in text, "first_step_s": _first_step_s(text), "final_loss": last["loss"]}


def _first_step_s(console: str) -> float | None:
    """Seconds from start to the first step, from moe-train's "first step done, N s after start" line."""
    for line in console.splitlines():
        if "first step done" in line:
            return float(line.split(",")[-1].split()[0])
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--paths", required=True, help="data.paths glob of the corpus (one format)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--work", type=Path, default=Path("/tmp/data_scale"))
    parser.add_argument("--skip-in-memory", action="store_true", help="skip the data.token_cache=null run")
    parser.add_argument("overrides", nargs="*", help="extra moe-train overrides for the training runs")
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    prepared, first_start = args.work / "prepared", args.work / "first_start"
    for cache in (prepared, first_start):
        shutil.rmtree(cache, ignore_errors=True)
    text_mb = _corpus_bytes(args.paths) / 1e6
    preps = [prepare(args.paths, prepared, args.work, "prepare"),
             prepare(args.paths, prepared, args.work, "prepare again")]
    preps[0]["text_mb_per_s"] = text_mb / preps[0]["wall_s"]
    # no moe-prepare-data: the first start's actors build the cache themselves (one tokenises)
    runs = [train(args.paths, str(first_start), args.work, label, args.steps, args.overrides)
            for label in ("first start", "second start")]
    if not args.skip_in_memory:
        try:
            runs.append(train(args.paths, "null", args.work, "in memory", args.steps, args.overrides))
        except Failed as err:  # killed for memory: that is the measurement
            runs.append({"run": "in memory", "failed": str(err)})
            print(f"in memory: failed: {err}")
    print(f"corpus: {text_mb:,.0f} MB of files ({args.paths})")
    print_table(preps, ["run", "wall_s", "text_mb_per_s", "tokens", "peak_rss_mb", "tokenised"])
    print_table(runs, ["run", "wall_s", "actor_peak_rss_mb", "max_actor_peak_rss_mb", "first_step_s", "tokenised",
                       "final_loss"])
    path = write_json("data_scale", {"corpus_mb": text_mb, "paths": args.paths, "steps": args.steps,
                                     "prepare": preps, "train": runs, "overrides": args.overrides})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
