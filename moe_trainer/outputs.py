"""Where a run's results go: resolved config, ``metrics.jsonl``, and the W&B run, all in the run dir.

Records are written with the same keys by every strategy; W&B gets the same
values flattened into ``train/``, ``balance/``, ``perf/`` and ``eval/`` panels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from moe_trainer.config.schema import LoggerConfig
from moe_trainer.logging import RunLogger

_PANELS = {
    "loss": "train", "aux_loss": "train", "z_loss": "train", "total_loss": "train", "lr": "train",
    "grad_norm": "train", "tokens": "train", "val_loss": "eval",
    "tokens_per_s": "perf", "step_time_s": "perf",
    "load_imbalance": "balance", "load_cv": "balance", "dropped_frac": "balance", "router_entropy": "balance",
}


def wandb_metrics(record: dict[str, Any]) -> dict[str, float]:
    """Flattens a metrics record into W&B keys (``panel/name``, per layer ``balance/layerN/...``)."""
    flat: dict[str, float] = {}
    for key, value in record.items():
        if key in _PANELS:
            flat[f"{_PANELS[key]}/{key}"] = value
    for i, layer in enumerate(record.get("layers", [])):
        for name in ("max_mean", "cv", "dropped_frac", "router_entropy"):
            flat[f"balance/layer{i}/{name}"] = layer[name]
        for e, load in enumerate(layer["tokens_per_expert"]):
            flat[f"balance/layer{i}/tokens_expert{e}"] = load
    return flat


class RunOutputs:
    """Owns the run directory's files and the W&B run; every write is best effort for W&B only."""

    def __init__(self, run_dir: Path, resolved_config: dict[str, Any], logger_cfg: LoggerConfig,
                 strategy: str) -> None:
        self.run_dir = run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved_config, sort_keys=False))
        self.metrics_path = run_dir / "metrics.jsonl"
        self._metrics = self.metrics_path.open("a")
        self.wandb = RunLogger(logger_cfg, run_dir, job_type=strategy, config=resolved_config)

    def log(self, record: dict[str, Any]) -> None:
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        self.wandb.log(wandb_metrics(record), step=int(record["step"]))

    def summary(self, values: dict[str, Any]) -> None:
        (self.run_dir / "summary.json").write_text(json.dumps(values, indent=1))
        self.wandb.log_summary(values)

    def close(self) -> None:
        self._metrics.close()
        self.wandb.finish()
