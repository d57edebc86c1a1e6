"""``moe-report --wandb``: the W&B workspace view, written offline, its refusals, a failed save.

Whether every panel key is a key the runs logged is checked on a real multirun of the three
Ray strategies, in ``tests/test_compare.py``; here the runs are single-process, W&B offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from moe_trainer.logging.metric_keys import RANK_MAX, layer_key
from moe_trainer.report import main
from moe_trainer.report.dashboard import SECTIONS, WORKSPACE_FILE, panel_keys
from moe_trainer.report.wandb_view import load_saved
from moe_trainer.train.aggregate import EXPERT_ROLE_KEYS, PER_RANK_KEYS
from tests.helpers import train_run, tree_state


def with_logger(run_dir: Path, into: Path, **logger: str) -> Path:
    """A copy of a run dir whose config has other ``logger`` settings (another W&B group, say)."""
    copy = shutil.copytree(run_dir, into)
    config = yaml.safe_load((copy / "config.yaml").read_text())
    config["logger"].update(logger)
    (copy / "config.yaml").write_text(yaml.safe_dump(config))
    return copy


@pytest.fixture(scope="module")
def logged(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real single-process run that logged to W&B offline (group ``default``), a copy, and a copy without W&B."""
    root = tmp_path_factory.mktemp("logged")
    train_run(root / "a", "train.max_steps=3", "logger.mode=offline")
    shutil.copytree(root / "a", root / "b")
    off = with_logger(root / "a", root / "off", mode="disabled")
    shutil.rmtree(off / "wandb")  # what a run with logger.mode=disabled leaves: no W&B run
    return {name: root / name for name in ("a", "b", "off")}


@pytest.fixture
def no_wandb_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def view_panels(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for s in view["spec"]["section"]["panelBankConfig"]["sections"] for p in s["panels"]]


def test_offline_writes_the_view_of_the_group_and_says_how_to_save_it(
        logged: dict[str, Path], tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    main([str(logged["a"]), str(logged["b"]), "--out", str(out), "--wandb", "my-team/moe-trainer"])
    printed = capsys.readouterr().out
    path = out / WORKSPACE_FILE
    assert (f"not saved in W&B (no W&B API key (WANDB_API_KEY or `wandb login`)); save it with: "
            f"moe-report --save-wandb {path}") in printed
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
    # the panels read exactly the keys panel_keys names, for the runs' 2 MoE layers; bars read summary keys
    history, summary = panel_keys(layers=2)
    lines = [p["config"] for p in view_panels(view) if p["viewType"] == "Run History Line Plot"]
    bars = [p["config"] for p in view_panels(view) if p["viewType"] == "Bar Chart"]
    assert {k for c in lines for k in [*c["metrics"], c["xAxis"]]} == history
    assert {k for c in bars for k in c["metrics"]} == summary == {"time_to_first_step_s", "tokens_per_s_mean"}
    assert {layer_key(1, "max_mean"), layer_key(1, "tokens_per_expert"), "perf/step_time_s_max"} <= history
    assert layer_key(2, "max_mean") not in history
    # what --save-wandb sends is what was written
    assert load_saved(path)._model.model_dump(by_alias=True, exclude_none=True) == view


def test_a_max_over_ranks_is_only_asked_of_keys_logged_per_rank() -> None:
    for _, charts in SECTIONS:
        for chart in charts:
            if chart.rank_max:
                assert set(chart.keys) <= {*PER_RANK_KEYS, *EXPERT_ROLE_KEYS}, chart.title
                assert all(k.endswith(RANK_MAX) for k in chart.metrics(0)[1::2]), chart.title


def test_a_second_report_updates_the_view_saved_before(logged: dict[str, Path], tmp_path: Path,
                                                      no_wandb_key: None) -> None:
    """W&B gave the saved view a name and id (written into the file); the same view built again keeps them."""
    out = tmp_path / "report"
    args = [str(logged["a"]), "--out", str(out), "--wandb", "my-team/moe-trainer"]
    main(args)
    path = out / WORKSPACE_FILE
    saved = {**json.loads(path.read_text()), "name": "nw-abc123", "id": "Vmlldzox"}
    path.write_text(json.dumps(saved))
    main(args)
    assert {k: json.loads(path.read_text())[k] for k in ("name", "id")} == {"name": "nw-abc123", "id": "Vmlldzox"}
    main([*args[:-1], "other-team/moe-trainer"])  # another view: W&B names it when it is saved
    assert json.loads(path.read_text())["name"] == ""


BAD = {
    "not entity/project": (["--wandb", "moe-trainer"], "--wandb 'moe-trainer' is not ENTITY/PROJECT: "),
    "two slashes": (["--wandb", "a/b/c"], "--wandb 'a/b/c' is not ENTITY/PROJECT: "),
    "no such group": (["--wandb", "a/moe-trainer", "--group", "ablation"],
                      "--group 'ablation': none of the 2 runs given is in that W&B group (their logger.group: "
                      "default, other)"),
    "several groups": (["--wandb", "a/moe-trainer"],
                       "the runs given logged to 2 W&B groups (default, other): choose the view's group with --group"),
    "another project": (["--wandb", "a/moe-trainr", "--group", "default"],
                        "--wandb .../moe-trainr: 2 runs given logged to W&B project moe-trainer (logger.project), "
                        "not 'moe-trainr'"),
    "online without a key": (["--wandb", "a/moe-trainer", "--group", "default", "--wandb-mode", "online"],
                             "--wandb-mode online saves the view in W&B and needs a W&B API key: set WANDB_API_KEY "
                             "or run `wandb login`"),
    "a quote in the group": (["--wandb", "a/moe-trainer", "--group", "bob's"],
                             "logger.group \"bob's\" cannot be written into a W&B view's run filter (SyntaxError"),
    "an equals sign in the group": (["--wandb", "a/moe-trainer", "--group", "lr=3e-4"],
                                    "logger.group 'lr=3e-4' cannot be written into a W&B view's run filter (it would "
                                    "read 'lr==3e-4')"),
    "a backslash in the group": (["--wandb", "a/moe-trainer", "--group", "a\\b"],
                                 "logger.group 'a\\\\b' cannot be written into a W&B view's run filter (it would "
                                 "read 'a\\x08')"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_message_and_leaves_the_report_untouched(
        logged: dict[str, Path], tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str],
        case: str) -> None:
    args, message = BAD[case]
    group = {"a quote in the group": "bob's", "a backslash in the group": "a\\b",
             "an equals sign in the group": "lr=3e-4"}.get(case, "other")
    other = with_logger(logged["b"], tmp_path / "runs" / "b", group=group)
    out = tmp_path / "report"
    out.mkdir()
    (out / "summary.md").write_text("an earlier report\n")
    before = tree_state(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([str(logged["a"]), str(other), "--out", str(out), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moe-report: {message}") and err.count("\n") == 1, err
    assert tree_state(tmp_path) == before


def test_a_run_that_did_not_log_to_wandb_is_named_not_left_out(logged: dict[str, Path], tmp_path: Path,
                                                                no_wandb_key: None,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([str(logged["a"]), str(logged["off"]), "--out", str(tmp_path / "report"), "--wandb", "a/moe-trainer"])
    assert exit_info.value.code == 2 and not (tmp_path / "report").exists()
    assert capsys.readouterr().err == (
        "moe-report: 1 run given did not log to W&B (W&B was off: logger.mode or WANDB_MODE=disabled, or it failed "
        f"to start), so a W&B view cannot show it: {logged['off']}; leave it out\n")


def test_a_group_with_symbols_keeps_its_name_in_the_filter(logged: dict[str, Path], tmp_path: Path,
                                                           no_wandb_key: None) -> None:
    """W&B refuses symbols in a view's title, not in a group: the title gets '-', the filter the group itself."""
    run = with_logger(logged["a"], tmp_path / "runs" / "lr", group="moe+bias|e16")
    main([str(run), "--out", str(tmp_path / "report"), "--wandb", "a/moe-trainer"])
    view = json.loads((tmp_path / "report" / WORKSPACE_FILE).read_text())
    assert view["displayName"] == "moe-trainer strategies: moe-bias-e16"
    assert [f["value"] for f in view["spec"]["section"]["runSets"][0]["filters"]["filters"]] == ["moe+bias|e16"]


def test_wandb_mode_online_from_the_environment_without_a_key_is_named(
        logged: dict[str, Path], tmp_path: Path, no_wandb_key: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("WANDB_MODE", "online")
    with pytest.raises(SystemExit):
        main([str(logged["a"]), "--out", str(tmp_path / "report"), "--wandb", "a/moe-trainer"])
    assert capsys.readouterr().err.startswith("moe-report: WANDB_MODE=online saves the view in W&B and needs a W&B "
                                              "API key")


def test_a_failed_save_keeps_the_report_and_the_view_and_says_how_to_retry(
        logged: dict[str, Path], tmp_path: Path, no_wandb_key: None, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The network is the one thing replaced: W&B's GraphQL call raises as it does when the server is unreachable."""
    import wandb_workspaces.workspaces.internal as ws_internal

    def unreachable(view: Any) -> dict[str, Any]:
        raise ConnectionError("HTTPSConnectionPool(host='api.wandb.ai', port=443): Max retries exceeded")

    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setattr(ws_internal, "upsert_view2", unreachable)
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exit_info:
        main([str(logged["a"]), "--out", str(out), "--wandb", "a/moe-trainer"])
    assert exit_info.value.code == 1
    path = out / WORKSPACE_FILE
    err = capsys.readouterr().err
    assert err == (f"moe-report: saving the W&B view failed (ConnectionError: HTTPSConnectionPool(host='api.wandb.ai', "
                   f"port=443): Max retries exceeded); it is kept in {path}; save it later with: moe-report "
                   f"--save-wandb {path}\n")
    assert (out / "summary.md").is_file() and load_saved(path) is not None
    with pytest.raises(SystemExit) as exit_info:  # the retry reaches W&B again (and fails the same way)
        main(["--save-wandb", str(path)])
    assert exit_info.value.code == 1


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"), ("{}", "not a view written by moe-report --wandb (ValidationError: ")])
def test_save_later_refuses_what_it_cannot_save(tmp_path: Path, no_wandb_key: None, capsys: pytest.CaptureFixture[str],
                                                content: str | None, message: str) -> None:
    view = tmp_path / WORKSPACE_FILE
    if content is not None:
        view.write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        main(["--save-wandb", str(view)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith(f"moe-report: --save-wandb {view}: {message}")


def test_save_later_without_a_key_names_what_is_missing(logged: dict[str, Path], tmp_path: Path, no_wandb_key: None,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    main([str(logged["a"]), "--out", str(tmp_path), "--wandb", "a/moe-trainer"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["--save-wandb", str(tmp_path / WORKSPACE_FILE)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("moe-report: --save-wandb saves the view in W&B and needs a W&B API key: "
                                       "set WANDB_API_KEY or run `wandb login`\n")
