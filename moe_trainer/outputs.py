"""Where a run's results go: resolved config, ``metrics.jsonl``, step timelines and the W&B run, all in the run dir.

Records are written with the same keys by every strategy; W&B gets the same
values flattened into ``train/``, ``balance/``, ``perf/`` and ``eval/`` panels.
A sampled step's timeline (every rank's events) is a file of its own,
``timelines/step_NNNNNN.json`` (Chrome trace), saved to the W&B run as a file: as
metrics it would be thousands of values per step that no chart can draw.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from moe_trainer.config.schema import LoggerConfig
from moe_trainer.logging import RunLogger
from moe_trainer.logging.metric_keys import EXPERT_LOAD_TABLE, LAYER_HISTOGRAM, LAYER_STATS, layer_key, panel, wandb_key
from moe_trainer.logging.wandb_logger import WANDB_ID_FILE
from moe_trainer.timeline import chrome_trace
from moe_trainer.train.aggregate import TIMELINE_KEY

TIMELINES_DIR = "timelines"  # in the run dir: one Chrome trace per sampled step


def timeline_path(run_dir: Path, step: int) -> Path:
    """Where step ``step``'s trace goes: ``RUN_DIR/timelines/step_000002.json`` (sorts by step)."""
    return run_dir / TIMELINES_DIR / f"step_{step:06d}.json"


def wandb_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """Flattens a metrics record into W&B keys: ``panel/name``, per MoE layer ``balance/layerN/...``.

    Per-expert loads become one histogram per layer whose bins are the experts, which W&B
    draws over steps as a heatmap; the raw counts stay in ``metrics.jsonl``.
    """
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if panel(key) is not None and isinstance(value, int | float):
            flat[wandb_key(key)] = value
    for i, layer in enumerate(record.get("layers", [])):
        for name in LAYER_STATS:
            flat[layer_key(i, name)] = layer[name]
        flat[layer_key(i, LAYER_HISTOGRAM)] = expert_histogram(layer[LAYER_HISTOGRAM])
    for i, bias in enumerate(record.get("expert_bias", [])):
        flat[layer_key(i, "bias_max_abs")] = max(abs(b) for b in bias)
    return flat


def expert_histogram(load: list[int]) -> Any:
    import numpy as np
    import wandb

    return wandb.Histogram(np_histogram=(np.asarray(load, dtype=np.float64), np.arange(len(load) + 1)))


class RunOutputs:
    """Owns the run directory's files and the W&B run; every write is best effort for W&B only.

    ``wandb_run_id``: the W&B run to continue (a resume); its id is kept in ``wandb/run_id`` so
    that a later resume from this run directory continues the same W&B run again.
    """

    def __init__(self, run_dir: Path, resolved_config: dict[str, Any], logger_cfg: LoggerConfig,
                 strategy: str, wandb_run_id: str | None = None) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = self.metrics_path.open("a")
        self.strategy, self.group = strategy, logger_cfg.group
        tags = [*logger_cfg.tags, strategy]
        self.wandb = RunLogger(replace(logger_cfg, tags=tags), run_dir, job_type=strategy, config=resolved_config,
                               run_id=wandb_run_id)
        if self.wandb.run_id:
            (run_dir / WANDB_ID_FILE).parent.mkdir(exist_ok=True)
            (run_dir / WANDB_ID_FILE).write_text(self.wandb.run_id + "\n")
        self._load_rows: list[list[int]] = []  # (step, layer, expert, tokens) for the expert-load table
        # this start's first evaluation: a restart after a lost process reports it, not a second one
        self.first_val_loss: float | None = None

    def log(self, record: dict[str, Any]) -> None:
        """Writes a record to ``metrics.jsonl`` and W&B; timeline events never go there (see :meth:`write_timeline`)."""
        record = {k: v for k, v in record.items() if k != TIMELINE_KEY}
        if self.first_val_loss is None and "val_loss" in record:
            self.first_val_loss = float(record["val_loss"])
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self.wandb.active:
            self.wandb.log(wandb_metrics(record), step=int(record["step"]))
            for i, layer in enumerate(record.get("layers", [])):
                self._load_rows.extend([record["step"], i, e, n] for e, n in enumerate(layer["tokens_per_expert"]))

    def write_timeline(self, step: int, events: list[dict[str, Any]]) -> Path:
        """Writes step ``step``'s events of every rank as a Chrome trace and adds it to the W&B run's files.

        The trace starts at 0 for the step; ``chrome://tracing``, https://ui.perfetto.dev and
        ``moe-report`` open it. A step redone after a restart overwrites its file.
        """
        path = timeline_path(self.run_dir, step)
        path.parent.mkdir(exist_ok=True)
        trace = chrome_trace(events, {"strategy": self.strategy, "step": step, "group": self.group,
                                      "run_dir": str(self.run_dir)})
        path.write_text(json.dumps(trace, separators=(",", ":")))
        self.wandb.save_file(path, f"{TIMELINES_DIR}/{path.name}")
        return path

    def write_processes(self, info: dict[str, Any]) -> None:
        """``processes.json``: which process (pid, node) is which rank, rewritten after each restart."""
        (self.run_dir / "processes.json").write_text(json.dumps(info, indent=1))

    def summary(self, values: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(values, indent=1))
        self.wandb.log_summary(values)
        if self._load_rows:
            self.wandb.log_table(EXPERT_LOAD_TABLE, ["step", "layer", "expert", "tokens"], self._load_rows,
                                 step=values.get("steps", 0))

    def close(self) -> None:
        self._metrics.close()
        self.wandb.finish()
