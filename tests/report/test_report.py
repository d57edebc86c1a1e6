"""``moe-report`` on real run dirs written by ``moe-train``'s own ``train`` (single process, no Ray)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from moe_trainer.cli import train
from moe_trainer.config.schema import to_dataclass
from moe_trainer.report import build_report, main
from moe_trainer.report.plots import heatmap_figure, line_figure, loss_figure
from moe_trainer.report.summary import COLUMNS
from tests.conftest import compose_dict
from tests.helpers import read_records

MOE_REPORT = str(Path(sys.executable).parent / "moe-report")
LINE_PLOTS = ("tokens_per_s.png", "comm_share.png", "load_imbalance.png", "load_cv.png", "load_min_share.png",
              "loss_vs_step.png", "loss_vs_tokens.png")
STEPS = 10
VARIANTS = {"base": [], "capacity": ["moe.capacity_factor=1.0"], "experts8": ["moe.num_experts=8"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three real single-process runs that differ in one MoE setting each."""
    root = tmp_path_factory.mktemp("runs")
    dirs = {}
    for name, overrides in VARIANTS.items():
        dcfg = compose_dict(["experiment=debug", f"train.max_steps={STEPS}", "train.eval_every=5", *overrides])
        train(to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True), root / name)  # type: ignore[arg-type]
        dirs[name] = root / name
    return dirs


def records(run_dir: Path) -> list[dict[str, Any]]:
    return read_records(run_dir)


def table(md: str) -> list[dict[str, str]]:
    """The rows of the summary table in ``summary.md``, keyed by column name."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split(" | ")]
    assert tuple(header) == COLUMNS
    return [dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")), strict=True)) for line in lines[1:]]


def assert_real_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert height > 200 and width > 500, (path, pixels.shape)
    assert np.std(pixels[..., :3]) > 0.05, f"{path.name} is (nearly) blank"


def test_report_draws_every_figure_and_links_them(runs: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    loaded, files = build_report(list(runs.values()), out)
    heatmaps = [f"expert_load_{run.slug}_layer{i}.png" for run in loaded for i in range(2)]
    timelines = [f"timeline_{run.slug}_step000002.png" for run in loaded]  # logger.timeline_every=50: step 2 only
    assert sorted(files) == sorted([*LINE_PLOTS, *heatmaps, *timelines, "summary.md", "summary.html"])
    for name in [*LINE_PLOTS, *heatmaps, *timelines]:
        assert_real_png(out / name)
    md, page = (out / "summary.md").read_text(), (out / "summary.html").read_text()
    for name in [*LINE_PLOTS, *heatmaps, *timelines]:
        assert f"]({name})" in md and f'<img src="{name}"' in page
    assert page.count("<tr><td>") == len(runs) and page.count("<td>") == len(runs) * len(COLUMNS)


def test_summary_rows_hold_the_numbers_of_each_run(runs: dict[str, Path], tmp_path: Path) -> None:
    build_report(list(runs.values()), tmp_path)
    rows = table((tmp_path / "summary.md").read_text())
    assert len(rows) == len(runs)
    labels = [row["run"] for row in rows]
    assert len(set(labels)) == len(labels) and all(label.startswith("single (") for label in labels)
    assert "capacity_factor=1.0" in labels[1] and "num_experts=8" in labels[2]
    for row, run_dir in zip(rows, runs.values(), strict=True):
        recs = records(run_dir)
        trains = [r for r in recs if "loss" in r]
        vals = [r for r in recs if "val_loss" in r and "loss" not in r]
        steady = trains[len(trains) // 5:]  # 10 steps: steps 1-2 are warm-up
        summary = json.loads((run_dir / "summary.json").read_text())
        assert row["strategy"] == "single" and row["processes"] == "1" and row["steps"] == str(STEPS)
        assert row["final val loss"] == f"{vals[-1]['val_loss']:.4f}"
        assert row["final val loss"] == f"{summary['final_val_loss']:.4f}"
        assert row["final train loss"] == f"{trains[-1]['loss']:.4f}"
        assert row["tokens/s"] == f"{sum(r['tokens_per_s'] for r in steady) / len(steady):,.0f}"
        assert row["comm share"] == "0.0%"  # single logs no communication
        assert row["max/mean load"] == f"{np.mean([r['load_imbalance'] for r in trains]):.3f}"
        assert row["params total"] == f"{summary['params_total'] / 1e3:.3g}K"
        assert row["params active"] == f"{summary['params_active'] / 1e3:.3g}K"
    base, capacity, experts8 = rows
    assert base["dropped frac"] == "0.0000" and float(capacity["dropped frac"]) > 0  # capacity 1.0 drops tokens
    assert float(experts8["params total"].rstrip("K")) > float(base["params total"].rstrip("K"))


def test_unfinished_run_with_new_keys_resume_and_torn_line_still_reports(runs: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    run_dir = tmp_path / "crashed"
    shutil.copytree(runs["base"], run_dir, ignore=shutil.ignore_patterns("checkpoints"))
    (run_dir / "summary.json").unlink()  # killed before the summary was written
    recs = records(run_dir)
    for record in recs:
        if "loss" in record:  # telemetry a later version might add, plus a Ray-style comm share
            record.update(comm_share=0.25, future_metric={"nested": [1, 2]})
    redo = {**[r for r in recs if "loss" in r][-1], "loss": 1.25}  # a resume re-logs the last step
    lines = [json.dumps(r) for r in [*recs, redo]] + ['{"step": 11, "loss": 3.1, "tok']
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    loaded, _ = build_report([run_dir], tmp_path / "report")
    assert loaded[0].skipped_lines == 1 and len(loaded[0].train) == STEPS
    [row] = table((tmp_path / "report" / "summary.md").read_text())
    assert row["run"] == "single" and row["processes"] == "–" and row["params total"] == "–"
    assert row["comm share"] == "25.0%" and row["final train loss"] == "1.2500"
    assert row["final val loss"] == f"{[r for r in recs if 'val_loss' in r][-1]['val_loss']:.4f}"


def test_cli_finds_runs_in_a_multirun_dir_and_writes_the_report_there(runs: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "2026-11-25" / "10-00-00"
    for i, src in enumerate([runs["base"], runs["capacity"], runs["base"]]):
        shutil.copytree(src, sweep / f"{i}-single", ignore=shutil.ignore_patterns("checkpoints"))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    date_dir = sweep.parent  # two levels above the run dirs
    proc = subprocess.run([MOE_REPORT, str(date_dir)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = date_dir / "report"
    assert proc.stdout.strip().splitlines()[-1] == str(out)
    rows = table((out / "summary.md").read_text())
    # 0 and 2 have the same config: their dir names tell them apart
    assert [r["run"] for r in rows] == ["single (0-single)", "single (1-single)", "single (2-single)"]
    assert rows[0]["final val loss"] == rows[2]["final val loss"] != rows[1]["final val loss"]
    for name in LINE_PLOTS:
        assert_real_png(out / name)
    main([str(date_dir), "--out", str(tmp_path / "again")])  # the report dir now inside is not a run
    assert len(table((tmp_path / "again" / "summary.md").read_text())) == 3


def test_paths_without_runs_exit_2_naming_them(runs: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    with pytest.raises(SystemExit) as exc:
        main([str(empty), str(missing)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("moe-report: no run directory") and str(empty) in err and str(missing) in err
    with pytest.raises(SystemExit) as exc:  # one bad path among good ones is still an error
        main([str(runs["base"]), str(missing), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2 and str(missing) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_short_run_is_drawn_as_points_with_a_note_and_axes_end_at_the_last_step(runs: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    """A run with two logged steps (issue 15): no two-point "curve", no heatmap column past its end."""
    short_dir = tmp_path / "short"
    dcfg = compose_dict(["experiment=debug", "train.max_steps=4", "train.log_every=2", "train.eval_every=4"])
    train(to_dataclass(dcfg), OmegaConf.to_container(dcfg, resolve=True), short_dir)  # type: ignore[arg-type]
    loaded, _ = build_report([short_dir, runs["base"]], tmp_path / "report")
    short, full = loaded
    assert [r["step"] for r in short.train] == [2, 4]
    assert short.too_short == "only 2 logged steps, too short for a curve"
    assert full.too_short is None

    for fig in (line_figure(loaded, "tokens_per_s", None, "Throughput", "tokens/s"), loss_figure(loaded, False)):
        ax = fig.axes[0]
        drawn = {line.get_label(): line for line in ax.get_lines()}
        assert drawn[short.label].get_linestyle() == "None" and drawn[short.label].get_marker() == "o"
        assert drawn[full.label].get_linestyle() != "None"
        assert f"{short.label}: {short.too_short}" in [t.get_text() for t in ax.get_legend().get_texts()]
        assert ax.get_xlim()[1] == STEPS, "the step axis ends at the last logged step"

    short_map, full_map = heatmap_figure(short, 0), heatmap_figure(full, 0)
    assert short_map is not None and full_map is not None
    assert short_map.axes[0].get_xlim() == (0.0, 4.0)  # cells (0, 2] and (2, 4]: the steps they end at
    assert full_map.axes[0].get_xlim() == (0.0, float(STEPS))
    assert "(only 2 logged steps)" in short_map.axes[0].get_title()
    assert "logged step" not in full_map.axes[0].get_title()

    md, page = (tmp_path / "report" / "summary.md").read_text(), (tmp_path / "report" / "summary.html").read_text()
    assert f"- {short.label}: {short.too_short}; its figures show points" in md and short.too_short in page
    assert md.count("too short for a curve") == 1
