"""The checkpoint I/O benchmark runs end to end on a tiny model (100M-parameter numbers: docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.common
from benchmarks import checkpoint_io


@pytest.mark.slow
def test_checkpoint_io_measures_both_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    checkpoint_io.main(["--ranks", "2", "--d-model", "64", "--experts", "8", "--expert-hidden", "64",
                        "--dir", str(tmp_path / "ckpt"), "--json", "ckpt_io"])
    rows = {r["format"]: r for r in json.loads((tmp_path / "ckpt_io.json").read_text())["rows"]}
    assert set(rows) == {"dcp", "torch_save", "dcp (background)"}
    assert len(rows["dcp"]["per_rank"]) == 2 and rows["dcp (background)"]["blocking_s"] > 0
    # the old format reads every shard whole and stacks copies: its load holds more than the rank's own state
    assert rows["dcp"]["state_at_peak_x_max"] < rows["torch_save"]["state_at_peak_x_max"]
    assert not list((tmp_path / "ckpt").iterdir())  # every checkpoint it wrote was deleted
