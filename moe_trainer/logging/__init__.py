"""Experiment tracking: W&B run logging for training jobs and reading runs back for reports."""

from moe_trainer.logging.wandb_logger import DEFAULT_INIT_TIMEOUT, RunLogger, resolve_mode
from moe_trainer.logging.wandb_reader import (
    STEP_METRIC,
    OfflineRun,
    ScanStats,
    WandbLogFormatError,
    find_offline_runs,
    iter_records,
    read_offline_run,
)

__all__ = [
    "DEFAULT_INIT_TIMEOUT",
    "STEP_METRIC",
    "OfflineRun",
    "RunLogger",
    "ScanStats",
    "WandbLogFormatError",
    "find_offline_runs",
    "iter_records",
    "read_offline_run",
    "resolve_mode",
]
