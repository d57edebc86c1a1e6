"""Every command the README and the user guide show would start when pasted into a shell.

A pasted command runs in a fresh shell at the clone's root where nothing activated the
virtual environment, so it must call ``.venv/bin/moe-train`` (not bare ``moe-train``), and
its overrides must compose against ``conf/`` and pass validation as ``moe-train`` would
run them (Hydra's compose API; nothing trains). ``moe-report`` and ``moe-submit`` lines
are checked against their own argument parsers, and ``moe-submit``'s overrides compose too.
"""

from __future__ import annotations

import itertools
import re
import shlex
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from launch.submit import COMMANDS, _command_parser, _submit_parser
from moe_trainer.cli import CONF_DIR
from moe_trainer.config.command_line import check_command_line
from moe_trainer.config.schema import to_dataclass
from moe_trainer.config.validate import validate
from moe_trainer.hub import export, generate, import_cli
from moe_trainer.report.cli import _parser as report_parser
from tests.conftest import compose_dict

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "docs/user-guide.md")
PROGRAMS = ("moe-train", "moe-report", "moe-submit", "moe-plan", "moe-export", "moe-import", "moe-generate")
HUB_PARSERS = {"moe-export": export.parser, "moe-import": import_cli.parser, "moe-generate": generate.parser}
VENV_BIN = ".venv/bin/"
_CONTROL = {"&&", "||", ";", "|", "&"}
_REDIRECTS = {">", ">>", "<", "2>", "&>"}


@dataclass(frozen=True)
class DocCommand:
    source: str  # where it is written, "README.md:42"
    program: str  # how the line calls it: ".venv/bin/moe-train", "moe-train"
    args: tuple[str, ...]  # its arguments as the shell passes them

    @property
    def name(self) -> str:
        return Path(self.program).name


def commands_in(text: str, source: str) -> list[DocCommand]:
    """Our programs' invocations in the ```bash blocks of ``text``, one per simple command.

    A line is cut at the shell's control operators (``a && b``), comments and redirections
    are dropped, so ``python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/moe-train``
    yields its last part.
    """
    found = []
    for block in re.finditer(r"```bash\n(.*?)\n```", text, flags=re.S):
        first_line = text.count("\n", 0, block.start(1)) + 1
        for offset, line in enumerate(block.group(1).splitlines()):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens = list(lexer)  # '#' starts a comment, as in the shell
            for is_control, group in itertools.groupby(tokens, key=lambda t: t in _CONTROL):
                words = _without_redirects(list(group))
                if not is_control and words and Path(words[0]).name in PROGRAMS:
                    found.append(DocCommand(f"{source}:{first_line + offset}", words[0], tuple(words[1:])))
    return found


def _without_redirects(words: list[str]) -> list[str]:
    kept, skip = [], False
    for word in words:
        if skip:
            skip = False
        elif word in _REDIRECTS:
            skip = True
        else:
            kept.append(word)
    return kept


def doc_commands() -> list[DocCommand]:
    return [cmd for doc in DOCS for cmd in commands_in((ROOT / doc).read_text(), doc)]


def compose_with_hydra(overrides: list[str]) -> DictConfig:
    """The composed config with its ``hydra`` node, which holds the sweeps a config sets."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def sweep_jobs(args: tuple[str, ...]) -> list[list[str]]:
    """The override lists of the jobs ``moe-train [-m] ARGS`` runs (one for a single run).

    ``-m`` expands sweeps (``moe.top_k=1,2``) and the sweeps a config sets itself
    (``hydra.sweeper.params``, as ``experiment=compare_strategies`` does), as Hydra's
    basic sweeper does: the cartesian product, command-line values winning.
    """
    multirun = any(a in ("-m", "--multirun") for a in args)
    overrides = [a for a in args if not a.startswith("-")]
    if "--cfg" in args:  # `--cfg job X=Y`: the word after the flag is its value
        overrides.remove(args[args.index("--cfg") + 1])
    if not multirun:
        return [overrides]
    parser = OverridesParser.create()
    given = parser.parse_overrides(overrides)
    hydra_cfg = compose_with_hydra([o.input_line for o in given if not o.is_sweep_override() and o.input_line])
    in_config = OmegaConf.select(hydra_cfg, "hydra.sweeper.params") or {}
    sweeps: dict[str, list[str]] = {}
    for override in parser.parse_overrides([f"{k}={v}" for k, v in in_config.items()]) + given:
        key = override.get_key_element()
        sweeps[key] = list(override.sweep_string_iterator()) if override.is_sweep_override() \
            else [override.get_value_element_as_str()]
    keys = list(sweeps)
    return [[f"{k}={v}" for k, v in zip(keys, values, strict=True)] for values in itertools.product(*sweeps.values())]


def stand_ins(paths: list[str], root: Path) -> list[str]:
    """Files under ``root`` standing in for the docs' own data (``/data/...``): one per entry,
    with the entry's extension (a directory, holding a ``.txt``, for an entry without one)."""
    out = []
    for i, entry in enumerate(paths):
        suffix = Path(entry.replace("*", "x")).suffix
        target = root / f"entry{i}{suffix}"
        if suffix:
            target.write_text('{"text": "a document"}\n' if suffix in (".json", ".jsonl") else "a document\n")
        else:
            target.mkdir()
            (target / "part.txt").write_text("a document\n")
        out.append(str(target))
    return out


def stand_in_tokenizer(root: Path) -> str:
    """A real tokenizer.json under ``root`` standing in for the docs' own (``/models/...``)."""
    from datasets import Dataset

    from moe_trainer.data.bpe import MIN_VOCAB, train_bpe

    path = root / "tokenizer.json"
    train_bpe(Dataset.from_dict({"text": ["a document"]}), MIN_VOCAB).save(path)
    return str(path)


def check_moe_train(args: tuple[str, ...] | list[str]) -> None:
    """What moe-train checks before it starts: the command line as a whole (unknown keys, syntax,
    each swept value), then every job it would run composed and validated, the docs' data
    paths and tokenizer.json replaced by stand-in files of the same kinds. ``--plan`` is moe-train's own
    flag, taken off before Hydra sees the rest (as ``moe_trainer.cli.main`` does)."""
    args = [a for a in args if a != "--plan"]
    check_command_line(args, CONF_DIR)
    for overrides in sweep_jobs(tuple(args)):
        cfg = to_dataclass(compose_dict(overrides))
        with tempfile.TemporaryDirectory() as root:
            if cfg.data.paths:
                cfg.data.paths = stand_ins(list(cfg.data.paths), Path(root))
            if cfg.data.tokenizer not in ("byte", "bpe"):
                cfg.data.tokenizer = stand_in_tokenizer(Path(root))
            # train.init_from names a directory an earlier command of the doc exports (which tests/hub
            # checks at small scale); the rest of the command must stand on its own
            cfg.train.init_from = None
            validate(cfg)


def check(cmd: DocCommand) -> None:
    """Checks ``cmd`` as its program would parse it, without running anything."""
    if cmd.name in ("moe-train", "moe-plan"):  # moe-plan takes moe-train's overrides
        check_moe_train(cmd.args)
    elif cmd.name == "moe-report":
        report_parser().parse_args(list(cmd.args))
    elif cmd.name in HUB_PARSERS:
        HUB_PARSERS[cmd.name]().parse_args(list(cmd.args))
    elif cmd.args and cmd.args[0] in COMMANDS:  # moe-submit status|stop|logs JOB_ID
        _command_parser(cmd.args[0]).parse_args(list(cmd.args[1:]))
    else:
        check_moe_train(_submit_parser().parse_intermixed_args(list(cmd.args)).overrides)


COMMANDS_IN_DOCS = doc_commands()


@pytest.mark.parametrize("cmd", COMMANDS_IN_DOCS, ids=lambda c: f"{c.source}:{c.name}")
def test_doc_command_composes(cmd: DocCommand) -> None:
    check(cmd)


@pytest.mark.parametrize("cmd", COMMANDS_IN_DOCS, ids=lambda c: f"{c.source}:{c.name}")
def test_doc_command_runs_without_an_activated_venv(cmd: DocCommand) -> None:
    assert cmd.program == VENV_BIN + cmd.name, (
        f"{cmd.source}: `{cmd.program}` is not found by a fresh shell; write `{VENV_BIN}{cmd.name}`")


def test_both_docs_have_examples_of_every_strategy() -> None:
    for doc in DOCS:
        cmds = [c for c in COMMANDS_IN_DOCS if c.source.startswith(doc + ":") and c.name == "moe-train"]
        strategies = {a.split("=", 1)[1] for c in cmds for a in c.args if a.startswith("parallel=")}
        assert {"data_parallel", "expert_parallel", "disaggregated"} <= strategies, doc


def test_the_checker_refuses_what_moe_train_refuses() -> None:
    """The checks can fail: a wrong key, a bad value, a bad sweep value, a bare program name."""
    bad = commands_in("```bash\nmoe-train moe.num_expert=4 # typo\n.venv/bin/moe-train moe.top_k=65\n"
                      ".venv/bin/moe-train -m moe.top_k=1,65\n.venv/bin/moe-submit -- parallel=ring\n```", "x")
    assert [c.source for c in bad] == ["x:2", "x:3", "x:4", "x:5"]
    for cmd in bad:
        with pytest.raises(Exception):  # noqa: B017 - Hydra's, OmegaConf's or our ConfigError
            check(cmd)
    assert bad[0].program != VENV_BIN + "moe-train"


def test_sweeps_expand_as_hydra_multirun_does() -> None:
    jobs = sweep_jobs(("-m", "experiment=compare_strategies", "moe.top_k=1,2"))
    assert len(jobs) == 6
    assert {j[0] for j in jobs} == {"parallel=data_parallel", "parallel=expert_parallel", "parallel=disaggregated"}
    assert sweep_jobs(("--cfg", "job", "moe.top_k=1")) == [["moe.top_k=1"]]
