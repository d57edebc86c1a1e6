"""``data.paths`` entries -> files: globs, directories, ``~``, duplicates, and the one-line refusals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import Config, DataConfig
from moe_trainer.config.validate import validate
from moe_trainer.data.paths import expand_data_paths
from moe_trainer.data.sources import load_corpus


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """b.txt, a.txt, c.jsonl, notes.csv, .hidden.txt and sub/d.txt."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    for name in ("b.txt", "a.txt", ".hidden.txt", "sub/d.txt"):
        (root / name).write_text(f"the text of {name}\n")
    (root / "c.jsonl").write_text('{"text": "json"}\n')
    (root / "notes.csv").write_text("a,b\n")
    return root


def test_a_glob_is_its_files_sorted(corpus_dir: Path) -> None:
    assert expand_data_paths([str(corpus_dir / "*.txt")]) == [str(corpus_dir / "a.txt"), str(corpus_dir / "b.txt")]
    assert expand_data_paths([str(corpus_dir / "**" / "*.txt")])[-1] == str(corpus_dir / "sub" / "d.txt")


def test_a_directory_is_its_visible_files_of_known_extensions(corpus_dir: Path) -> None:
    names = [Path(p).name for p in expand_data_paths([str(corpus_dir)])]
    assert names == ["a.txt", "b.txt", "c.jsonl"]  # no .csv, no hidden file, no subdirectory


def test_an_existing_file_with_pattern_characters_is_that_file(corpus_dir: Path) -> None:
    odd = corpus_dir / "r[1].txt"
    odd.write_text("one\n")
    assert expand_data_paths([str(odd)]) == [str(odd)]  # as a glob, [1] would match only "r1.txt"


def test_entries_keep_their_order_and_a_file_named_twice_is_read_once(corpus_dir: Path) -> None:
    files = expand_data_paths([str(corpus_dir / "b.txt"), str(corpus_dir / "*.txt"), str(corpus_dir / "." / "a.txt")])
    assert [Path(p).name for p in files] == ["b.txt", "a.txt"]


def test_tilde_is_the_home_directory(corpus_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(corpus_dir))
    assert expand_data_paths(["~/a.txt", "~/sub"]) == [str(corpus_dir / "a.txt"), str(corpus_dir / "sub" / "d.txt")]


@pytest.mark.parametrize("entry,problem", [
    ("*.parquet", "the pattern matches no file"),
    ("sub/*.txt/x", "the pattern matches no file"),
    ("empty", "the directory holds no file with a known extension"),
    ("missing.txt", "no such file or directory"),
])
def test_an_entry_naming_no_file_is_one_line_naming_data_paths(corpus_dir: Path, entry: str, problem: str) -> None:
    (corpus_dir / "empty").mkdir()
    with pytest.raises(ConfigError) as err:
        expand_data_paths([str(corpus_dir / entry)])
    message = str(err.value)
    assert err.value.setting == "data.paths" and err.value.value == str(corpus_dir / entry)
    assert problem in message and "globs such as data.paths=[/data/*.txt]" in message and "\n" not in message


def test_validation_accepts_what_the_loader_reads(make_config: Callable[..., Config], corpus_dir: Path) -> None:
    for entry in (corpus_dir / "*.txt", corpus_dir / "sub"):
        validate(make_config(f"data.paths=[{entry}]"))
    with pytest.raises(ConfigError) as err:  # a directory of mixed formats: caught before anything starts
        validate(make_config(f"data.paths=[{corpus_dir}]"))
    assert err.value.setting == "data.paths" and "mixes formats json (c.jsonl), text (a.txt)" in str(err.value)


def test_the_loader_reads_a_directory_and_a_glob(corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(DataConfig(paths=[str(corpus_dir / "sub"), str(corpus_dir / "[ab].txt")]),
                         cache_dir=str(tmp_path / "cache"))
    texts = sorted(list(corpus["train"]["text"]) + list(corpus["validation"]["text"]))
    assert texts == ["the text of a.txt\n", "the text of b.txt\n", "the text of sub/d.txt\n"]
