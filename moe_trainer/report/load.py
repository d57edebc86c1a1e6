"""Reads finished (or crashed, or still running) ``moe-train`` run directories from disk.

Only the files ``moe-train`` writes itself are used: ``config.yaml``, ``summary.json``,
``metrics.jsonl`` and the step timelines (``timelines/step_*.json``), so a report needs
neither a W&B server nor the W&B files. Everything is read
tolerantly: a run killed mid-write has no ``summary.json`` and may end in a half-written line,
and new record keys appear as strategies gain telemetry; none of that should stop a report.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

METRICS_FILE = "metrics.jsonl"
TIMELINE_FILE = re.compile(r"step_(\d+)\.json")  # in RUN_DIR/timelines/ (moe_trainer.outputs.timeline_path)
MAX_DEPTH = 2  # a Hydra sweep dir holds job dirs one level down; a date dir holds them two down
CURVE_MIN_STEPS = 3  # fewer logged steps draw a point or a straight segment: no curve to read a trend from


@dataclass
class Run:
    """One run directory, parsed: train and eval records are split because they share ``step``."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    train: list[dict[str, Any]]  # records with a ``loss``, sorted by step, one per step
    evals: list[dict[str, Any]]  # ``{"step", "val_loss"}`` records, sorted by step, one per step
    label: str = ""  # legend/table name, unique among the runs of one report (see assign_labels)
    slug: str = ""  # ``label`` made safe for file names
    skipped_lines: int = 0  # unparsable lines in metrics.jsonl (e.g. a truncated last line)
    timelines: dict[int, Path] = field(default_factory=dict)  # sampled step -> its Chrome trace file

    def setting(self, section: str, key: str, default: Any = None) -> Any:
        """``section.key`` of the run's resolved config; ``default`` when absent or null (older runs lack keys)."""
        values = self.config.get(section)
        value = values.get(key) if isinstance(values, dict) else None
        return default if value is None else value

    @property
    def strategy(self) -> str:
        return str(self.setting("parallel", "strategy") or "unknown")

    @property
    def num_layers(self) -> int:
        """MoE layers with routing statistics (0 for a dense model or a run with no train step)."""
        return max((len(r.get("layers") or []) for r in self.train), default=0)

    @property
    def too_short(self) -> str | None:
        """Says so when the run logged too few steps to draw a curve (None when it has enough).

        A short run (a smoke test, ``log_every`` close to ``max_steps``) would otherwise be
        drawn as a straight two-point line that reads like a trend.
        """
        n = len(self.train)
        if n >= CURVE_MIN_STEPS:
            return None
        return f"only {n} logged step{'' if n == 1 else 's'}, too short for a curve"

    def series(self, key: str, default: float | None = None) -> tuple[list[int], list[float]]:
        """``(steps, values)`` of a train-record key; records lacking it use ``default`` or are skipped."""
        steps: list[int] = []
        values: list[float] = []
        for record in self.train:
            value = record.get(key, default)
            if isinstance(value, int | float):
                steps.append(int(record["step"]))
                values.append(float(value))
        return steps, values


def _natural_key(path: Path) -> list[Any]:
    """Sorts ``10-x`` after ``2-x``: Hydra numbers sweep jobs without zero padding."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _walk(root: Path, depth: int) -> Iterable[Path]:
    if (root / METRICS_FILE).is_file():
        yield root
        return
    if depth == 0:
        return
    try:
        children = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key)
    except OSError:
        return
    for child in children:
        yield from _walk(child, depth - 1)


def find_run_dirs(path: Path, max_depth: int = MAX_DEPTH) -> list[Path]:
    """Run dirs (folders holding ``metrics.jsonl``) at ``path`` or up to ``max_depth`` levels below it.

    The search stops at the first run dir on each branch, so a report folder or checkpoint
    tree inside a run is never mistaken for another run.
    """
    return list(_walk(path, max_depth)) if path.is_dir() else []


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _by_step(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last one written winning: a resumed run appends the steps it redoes."""
    latest: dict[int, dict[str, Any]] = {}
    for record in records:
        latest[int(record["step"])] = record
    return [latest[s] for s in sorted(latest)]


def find_timelines(run_dir: Path) -> dict[int, Path]:
    """The step timelines a run dir holds, by step (empty when it has none)."""
    try:
        files = list((run_dir / "timelines").iterdir())
    except OSError:
        return {}
    found = {int(m.group(1)): f for f in files if (m := TIMELINE_FILE.fullmatch(f.name)) and f.is_file()}
    return dict(sorted(found.items()))


def load_run(path: Path) -> Run:
    """Parses one run dir; missing or damaged files give empty parts rather than an error."""
    train: list[dict[str, Any]] = []
    evals: list[dict[str, Any]] = []
    skipped = 0
    try:
        lines = (path / METRICS_FILE).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            skipped += 1
        elif isinstance(record.get("loss"), int | float):
            train.append(record)
        elif isinstance(record.get("val_loss"), int | float):
            evals.append(record)
    return Run(path=path, config=_read_yaml(path / "config.yaml"), summary=_read_json(path / "summary.json"),
               train=_by_step(train), evals=_by_step(evals), skipped_lines=skipped, timelines=find_timelines(path))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _short(value: Any, width: int = 16) -> str:
    text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _suffixes(group: Sequence[Run], max_keys: int = 2) -> list[str]:
    """What tells runs of one strategy apart: the config values that differ, else the dir names."""
    flats = [_flatten(run.config) for run in group]
    all_keys = dict.fromkeys(k for flat in flats for k in flat)  # ordered as in config.yaml
    keys = [k for k in all_keys if k != "parallel.strategy" and len({repr(f.get(k)) for f in flats}) > 1]
    if keys:
        suffixes = [", ".join(f"{k.rsplit('.', 1)[-1]}={_short(f.get(k))}" for k in keys[:max_keys]) for f in flats]
        if len(set(suffixes)) == len(suffixes):
            return suffixes
    return [run.path.name for run in group]


def _slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "_", text).strip("_") or "run"


def assign_labels(runs: Sequence[Run]) -> None:
    """Names each run by its strategy, plus a short suffix when several runs share a strategy.

    Labels go into legends and the table; slugs into heatmap file names. Both end up unique.
    """
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.strategy, []).append(run)
    for strategy, group in groups.items():
        if len(group) == 1:
            group[0].label = strategy
        else:
            for run, suffix in zip(group, _suffixes(group), strict=True):
                run.label = f"{strategy} ({suffix})"
    seen: dict[str, int] = {}
    for run in runs:
        base = run.label
        if base in seen:  # identical configs in identically named dirs: number them
            seen[base] += 1
            run.label = f"{base} #{seen[base]}"
        else:
            seen[base] = 1
    used: set[str] = set()
    for i, run in enumerate(runs):
        slug = _slugify(run.label)
        run.slug = slug if slug not in used else f"{slug}_{i}"
        used.add(run.slug)


def load_runs(paths: Sequence[Path]) -> tuple[list[Run], list[Path]]:
    """Every run dir found under ``paths`` (each once, in argument order), and the paths that held none."""
    found: list[Path] = []
    empty: list[Path] = []
    for path in paths:
        dirs = find_run_dirs(path)
        if not dirs:
            empty.append(path)
        for run_dir in dirs:
            if run_dir.resolve() not in {d.resolve() for d in found}:
                found.append(run_dir)
    runs = [load_run(d) for d in found]
    assign_labels(runs)
    return runs, empty
