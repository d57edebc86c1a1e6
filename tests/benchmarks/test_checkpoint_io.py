"""The checkpoint I/O benchmark runs end to end on a tiny model (100M-parameter numbers: docs/benchmarks.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.common
from benchmarks import checkpoint_io


@pytest.mark.slow
def test_checkpoint_io_measures_a_save_and_every_ranks_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One format, no background save: the script's path end to end (each format and each rank is a spawned
    process importing torch; the comparison of formats is what docs/benchmarks.md measures at 103M)."""
    monkeypatch.setattr(benchmarks.common, "RESULTS", tmp_path)
    checkpoint_io.main(["--ranks", "1", "--d-model", "64", "--experts", "8", "--expert-hidden", "64",
                        "--formats", "dcp", "--no-background", "--dir", str(tmp_path / "ckpt"), "--json", "ckpt_io"])
    (row,) = json.loads((tmp_path / "ckpt_io.json").read_text())["rows"]
    assert row["format"] == "dcp" and len(row["per_rank"]) == 1
    # the rank's load held about its own state, not copies of it (the old loader: 2.9x at 2 ranks)
    assert 0 < row["state_at_peak_x_max"] < 1.5
    assert not list((tmp_path / "ckpt").iterdir())  # every checkpoint it wrote was deleted
