"""``moe-train --help`` explains the trainer, each config group, the common overrides, and where to read more."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moe_trainer.cli import CONF_DIR
from tests.test_doc_commands import check_moe_train, commands_in

MOE_TRAIN = str(Path(sys.executable).parent / "moe-train")
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra")


@pytest.fixture(scope="module")
def help_text(tmp_path_factory: pytest.TempPathFactory) -> str:
    proc = subprocess.run([MOE_TRAIN, "--help"], cwd=tmp_path_factory.mktemp("help"), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_is_ours_not_hydras_stock_page(help_text: str) -> None:
    assert "powered by Hydra" not in help_text
    assert help_text.startswith("moe-train: train a Mixture-of-Experts")
    assert "d_model:" not in help_text, "the composed config is --cfg job's job, not --help's"


@pytest.mark.parametrize("group", GROUPS)
def test_every_group_has_a_one_line_explanation(help_text: str, group: str) -> None:
    assert re.search(rf"^  {group} +\w", help_text, flags=re.M), f"--help does not explain `{group}`"
    options = sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))
    assert f"{group}: {', '.join(options)}" in help_text  # Hydra's generated list of options


def test_help_names_every_strategy_sweeps_and_the_reference(help_text: str) -> None:
    for strategy in ("single", "data_parallel", "expert_parallel", "disaggregated"):
        assert strategy + " (" in help_text, strategy
    assert "moe-train -m " in help_text
    assert "docs/config.md" in help_text and "docs/user-guide.md" in help_text


def test_help_examples_compose(help_text: str) -> None:
    lines = [line.strip() for line in help_text.splitlines() if line.strip().startswith("moe-train ")]
    examples = commands_in("```bash\n" + "\n".join(lines) + "\n```", "--help")
    assert len(examples) >= 8
    for cmd in examples:
        check_moe_train(cmd.args)
