"""Text sources through the real `datasets` API: embedded stdlib corpus, local files, Hub errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset

from moe_trainer.config.errors import ConfigError
from moe_trainer.config.schema import DataConfig
from moe_trainer.data.sources import (
    EMBEDDED_SKIP_DIRS,
    embedded_corpus,
    load_corpus,
    split_documents,
    stdlib_source_files,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Fails fast whether or not the Hub is reachable (not found online, not cached offline).
MISSING_HUB_DATASET = "moe-trainer-tests/no-such-dataset-7f3a"


def _all_texts(corpus: datasets.DatasetDict) -> list[str]:
    return list(corpus["train"]["text"]) + list(corpus["validation"]["text"])


# ----------------------------------------------------------------------------- embedded corpus


@pytest.fixture(scope="module")
def embedded() -> datasets.DatasetDict:
    return load_corpus(DataConfig())


def test_embedded_corpus_is_real_python_within_cap(embedded: datasets.DatasetDict) -> None:
    texts = _all_texts(embedded)
    assert set(embedded) == {"train", "validation"}
    assert embedded["train"].column_names == embedded["validation"].column_names == ["text"]
    assert len(embedded["train"]) >= 1 and len(embedded["validation"]) >= 1
    total = sum(len(t.encode("utf-8")) for t in texts)
    assert 0.9 * DataConfig.embedded_max_bytes <= total <= DataConfig.embedded_max_bytes
    compiled = 0
    for i, text in enumerate(texts):
        try:
            compile(text, f"doc{i}", "exec", dont_inherit=True)
            compiled += 1
        except SyntaxError:  # only the one file cut at the byte cap may fail
            pass
    assert compiled >= len(texts) - 1
    assert any("import " in t and "def " in t for t in texts)


def test_embedded_selection_is_deterministic_and_capped() -> None:
    small = embedded_corpus(50_000)
    again = embedded_corpus(50_000)
    assert small["text"][:] == again["text"][:]
    assert sum(len(t.encode("utf-8")) for t in small["text"]) <= 50_000
    tiny = embedded_corpus(10)  # the first file, cut mid-line: the cap is a hard limit
    assert len(tiny) == 1 and len(tiny["text"][0].encode("utf-8")) <= 10


def test_embedded_skips_tests_and_site_packages() -> None:
    files = stdlib_source_files()
    assert len(files) > 100
    assert all(not (set(p.parts) & EMBEDDED_SKIP_DIRS) for p in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_embedded_cap_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="data.embedded_max_bytes"):
        embedded_corpus(0)


@pytest.mark.timeout(120)
def test_embedded_and_hub_error_work_offline_without_touching_hf_cache(tmp_path: Path) -> None:
    """With HF_*_OFFLINE set in the environment (read at import), in a fresh interpreter."""
    script = textwrap.dedent(
        f"""
        from moe_trainer.config.errors import ConfigError
        from moe_trainer.config.schema import DataConfig
        from moe_trainer.data import build_batch_source
        source = build_batch_source(DataConfig(embedded_max_bytes=200_000), batch_size=4, seed=0)
        assert source.train_batch(0)[0].shape == (4, 128)
        try:
            build_batch_source(DataConfig(hub_name={MISSING_HUB_DATASET!r}), batch_size=4, seed=0)
        except ConfigError as err:
            print("HUBERROR", err)
        """
    )
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=100)
    assert out.returncode == 0, out.stderr
    assert "HUBERROR data.hub_name=" in out.stdout and "HF_HUB_OFFLINE" in out.stdout
    written = [p for p in (tmp_path / "hf").rglob("*") if p.is_file()] if (tmp_path / "hf").exists() else []
    assert written == []


# ----------------------------------------------------------------------------- local files


def _cfg(paths: list[Path], **kw: object) -> DataConfig:
    return DataConfig(paths=[str(p) for p in paths], **kw)  # type: ignore[arg-type]


def test_local_text_files_are_one_document_each(tmp_path: Path) -> None:
    docs = [f"file {i}\nsecond line of {i}\n\nafter a blank line\n" for i in range(4)]
    files = []
    for i, doc in enumerate(docs):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(doc)
    corpus = load_corpus(_cfg(files, val_fraction=0.25), cache_dir=str(tmp_path / "cache"))
    assert len(corpus["train"]) == 3 and len(corpus["validation"]) == 1
    assert sorted(_all_texts(corpus)) == sorted(docs)


def test_local_jsonl_json_and_text_field(tmp_path: Path) -> None:
    rows = [{"id": i, "content": f"document number {i}"} for i in range(10)]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    plain = tmp_path / "b.json"
    plain.write_text(json.dumps(rows[5:]))
    corpus = load_corpus(_cfg([jsonl, plain], text_field="content"), cache_dir=str(tmp_path / "cache"))
    assert corpus["train"].column_names == ["text"]
    assert sorted(_all_texts(corpus)) == sorted(r["content"] for r in rows)


def test_local_parquet_drops_empty_documents(tmp_path: Path) -> None:
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": ["alpha beta", "", None, "gamma", "  \n", "delta"]}), path)
    corpus = load_corpus(_cfg([path]), cache_dir=str(tmp_path / "cache"))
    assert sorted(_all_texts(corpus)) == ["alpha beta", "delta", "gamma"]


def test_explicit_format_and_glob(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"part{i}.data").write_text(f"text of part {i}\n")
    corpus = load_corpus(
        DataConfig(paths=[str(tmp_path / "*.data")], format="text"), cache_dir=str(tmp_path / "cache")
    )
    assert len(_all_texts(corpus)) == 3


def test_missing_text_column_names_setting_value_and_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"body": "x", "title": "t"}\n{"body": "y", "title": "u"}\n')
    with pytest.raises(ConfigError) as err:
        load_corpus(_cfg([path]), cache_dir=str(tmp_path / "cache"))
    msg = str(err.value)
    assert err.value.setting == "data.text_field" and "data.text_field='text'" in msg
    assert "body" in msg and "title" in msg


def test_non_string_text_column(tmp_path: Path) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(ConfigError, match="data.text_field.*not strings"):
        load_corpus(_cfg([path]), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("name", "fmt", "setting"),
    [
        ("f.csv", "auto", "data.format"),
        ("f.txt", "yaml", "data.format"),
        ("missing.txt", "auto", "data.paths"),
    ],
)
def test_bad_paths_and_formats(tmp_path: Path, name: str, fmt: str, setting: str) -> None:
    if name != "missing.txt":
        (tmp_path / name).write_text("a,b\n")
    with pytest.raises(ConfigError) as err:
        load_corpus(_cfg([tmp_path / name], format=fmt), cache_dir=str(tmp_path / "cache"))
    assert err.value.setting == setting


def test_mixed_formats_rejected(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ConfigError, match="mixes formats"):
        load_corpus(_cfg([tmp_path / "a.txt", tmp_path / "b.jsonl"]), cache_dir=str(tmp_path / "cache"))


def test_malformed_json_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(ConfigError, match="data.paths.*could not be read as json"):
        load_corpus(_cfg([tmp_path / "bad.jsonl"]), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------- hub


@pytest.mark.timeout(60)
def test_hub_fails_fast_with_one_line_error(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_corpus(DataConfig(hub_name=MISSING_HUB_DATASET), cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 15
    assert err.value.setting == "data.hub_name" and MISSING_HUB_DATASET in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.timeout(30)
def test_hub_offline_setting_fails_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_DATASETS_OFFLINE=1 sets at import
    start = time.monotonic()
    with pytest.raises(ConfigError, match="data.hub_name=.*HF_HUB_OFFLINE.*not in the local HF cache"):
        load_corpus(
            DataConfig(hub_name="roneneldan/TinyStories", hub_config="default"),
            cache_dir=str(tmp_path / "cache"),
        )
    assert time.monotonic() - start < 5


def test_paths_and_hub_name_are_exclusive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not both"):
        load_corpus(DataConfig(paths=[str(tmp_path / "a.txt")], hub_name="x/y"))


# ----------------------------------------------------------------------------- split


def test_split_is_seeded_disjoint_and_never_empty() -> None:
    ds = Dataset.from_dict({"text": [f"doc {i}" for i in range(40)]})
    a, b = split_documents(ds, 0.1, seed=3), split_documents(ds, 0.1, seed=3)
    assert a["validation"]["text"][:] == b["validation"]["text"][:] and len(a["validation"]) == 4
    assert not set(a["train"]["text"]) & set(a["validation"]["text"])
    assert split_documents(ds, 0.1, seed=4)["validation"]["text"][:] != a["validation"]["text"][:]
    tiny = split_documents(ds.select(range(2)), 0.01)
    assert len(tiny["train"]) == len(tiny["validation"]) == 1
    assert len(split_documents(ds.select(range(3)), 0.99)["train"]) == 1


def test_single_document_is_split_by_text() -> None:
    text = "".join(f"line {i}\n" for i in range(100))
    parts = split_documents(Dataset.from_dict({"text": [text]}), 0.1)
    train, val = parts["train"]["text"][0], parts["validation"]["text"][0]
    assert train + val == text and train.endswith("\n")
    assert 0.05 * len(text) < len(val) < 0.15 * len(text)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.5])
def test_val_fraction_range(fraction: float) -> None:
    with pytest.raises(ConfigError, match="data.val_fraction"):
        split_documents(Dataset.from_dict({"text": ["a", "b"]}), fraction)


@pytest.mark.parametrize("long_from_bytes", [None, 0], ids=["short-load-quiet", "long-load-shows-bars"])
def test_progress_bars_only_for_long_local_loads(tmp_path: Path, capfd: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch, long_from_bytes: int | None) -> None:
    """Every process that loads data would draw datasets' bars for a sub-second load (issue 15)."""
    if long_from_bytes is not None:
        monkeypatch.setattr("moe_trainer.data.sources.LONG_PREPARATION_BYTES", long_from_bytes)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(20)))
    capfd.readouterr()
    corpus = load_corpus(_cfg([path]), cache_dir=str(tmp_path / "cache"))
    err = capfd.readouterr().err
    assert len(_all_texts(corpus)) == 20
    if long_from_bytes is None:
        assert err == "", f"progress output for a small load: {err[-500:]}"
        assert not datasets.utils.are_progress_bars_disabled(), "bars stay off after the load"
    else:
        assert "Generating train split" in err and "Filter" in err
