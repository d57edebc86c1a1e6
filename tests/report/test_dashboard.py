"""``moe-report --wandb``: the W&B workspace view, written offline, and its refusals.

Whether every panel key is a key the runs logged is checked on a real multirun of the three
Ray strategies, in ``tests/test_compare.py``; here the runs are single-process (``runs``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_trainer.logging.metric_keys import layer_key
from moe_trainer.report import main
from moe_trainer.report.dashboard import SECTIONS, WORKSPACE_FILE, load_workspace, panel_keys


@pytest.fixture
def no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def view_panels(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]


def test_offline_writes_the_view_of_the_group_and_says_how_to_save_it(
        runs: dict[str, Path], tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    main([*map(str, runs.values()), "--out", str(out), "--wandb", "my-team/moe-trainer"])
    printed = capsys.readouterr().out
    path = out / WORKSPACE_FILE
    assert f"save it with: moe-report --save-wandb {path}" in printed
    assert (out / "summary.md").is_file(), "the local report is written as without --wandb"
    view = json.loads(path.read_text())
    assert (view["entity"], view["project"]) == ("my-team", "moe-trainer")
    assert view["displayName"] == "moe-trainer strategies: default"
    (runset,) = view["spec"]["section"]["runSets"]
    assert runset["grouping"] == [{"section": "run", "name": "jobType"}]  # one line per strategy
    assert [(f["key"], f["op"], f["value"]) for f in runset["filters"]["filters"]] == [
        ({"section": "run", "name": "group"}, "=", "default")]
    sections = view["spec"]["section"]["panelBankConfig"]["sections"]
    assert [s["name"] for s in sections] == [name for name, _ in SECTIONS]
    # the panels read exactly the keys panel_keys names, for the runs' 2 MoE layers
    history, summary = panel_keys(layers=2)
    read = {k for p in view_panels(view) for k in [*p["config"]["metrics"], p["config"].get("xAxis", "train/step")]}
    assert read == history | {f"summary_metrics.{k}" for k in summary}
    assert {layer_key(1, "max_mean"), layer_key(1, "tokens_per_expert"), "perf/step_time_s_max"} <= history
    assert layer_key(2, "max_mean") not in history
    # what --save-wandb would send is what was written
    assert load_workspace(path)._model.model_dump(by_alias=True, exclude_none=True) == json.loads(path.read_text())


def one_group(run_dir: Path, group: str, into: Path) -> Path:
    copy = shutil.copytree(run_dir, into)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["logger"]["group"] = group
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.mark.parametrize("args, message", [
    (["--wandb", "moe-trainer"], "--wandb 'moe-trainer' is not ENTITY/PROJECT: "),
    (["--wandb", "a/b/c"], "--wandb 'a/b/c' is not ENTITY/PROJECT: "),
    (["--wandb", "a/b", "--group", "ablation"],
     "--group 'ablation': none of the 2 runs given logged to that W&B group (their logger.group: default, other)"),
    (["--wandb", "a/b"], "the 2 runs given logged to 2 W&B groups (default, other): choose the view's group "
                         "with --group"),
    (["--wandb", "a/b", "--wandb-mode", "online"],
     "--wandb-mode online saves the view in W&B and needs a W&B API key: set WANDB_API_KEY or run `wandb login`"),
])
def test_bad_input_is_one_message_and_leaves_the_report_untouched(
        runs: dict[str, Path], tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str],
        args: list[str], message: str) -> None:
    other = one_group(runs["capacity"], "other", tmp_path / "other")
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").write_text("an earlier report\n")
    with pytest.raises(SystemExit) as exit_info:
        main([str(runs["base"]), str(other), "--out", str(out), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-report: {message}") and err.count("\n") == 1, err
    assert [p.name for p in out.iterdir()] == ["summary.md"]
    assert (out / "summary.md").read_text() == "an earlier report\n"


def test_save_later_without_a_key_names_what_is_missing(tmp_path: Path, no_wandb_key: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    view = tmp_path / WORKSPACE_FILE
    view.write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        main(["--save-wandb", str(view)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("moe-report: --save-wandb saves the view in W&B and needs a W&B API key: "
                                       "set WANDB_API_KEY or run `wandb login`\n")
