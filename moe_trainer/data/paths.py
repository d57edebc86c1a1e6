"""What ``data.paths`` names: the one expansion of its entries into files, and their format.

Validation (before any actor starts) and the loader both call :func:`expand_data_paths`, so a
glob or a directory that validation accepts is exactly what the loader reads. This module
imports nothing heavy (no ``datasets``), so validation stays fast.

An entry of ``data.paths`` is, after ``~`` is expanded:

* a file: taken as it is, whatever its extension (``data.format`` may name the format);
* a glob (``*``, ``?``, ``[...]``; ``**`` crosses directories): the files it matches, sorted;
* a directory: its files with a known extension (:data:`EXTENSION_FORMATS`), sorted, not
  recursing into subdirectories (use ``DIR/**/*.txt`` for that) and skipping hidden files.

The result keeps the entries' order and drops a file named twice (by its real path).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from moe_trainer.config.errors import ConfigError

EXTENSION_FORMATS = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
}
FORMATS = ("text", "json", "parquet")
ALLOWED = "existing files, directories or globs such as data.paths=[/data/*.txt]"


def _directory_files(directory: str) -> list[str]:
    """Returns the visible files of `directory` with a known extension, sorted by name."""
    names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
    return [os.path.join(directory, n) for n in names
            if Path(n).suffix.lower() in EXTENSION_FORMATS and os.path.isfile(os.path.join(directory, n))]


def _expand_entry(entry: str) -> list[str]:
    """Returns the files one ``data.paths`` entry names; raises :class:`ConfigError` when it names none."""
    path = os.path.expanduser(entry)
    if os.path.isfile(path):  # an existing name is itself, even with [, * or ? in it
        return [path]
    if glob.has_magic(path):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        if not files:
            raise ConfigError("data.paths", entry, f"the pattern matches no file; give {ALLOWED}")
        return files
    if os.path.isdir(path):
        files = _directory_files(path)
        if not files:
            raise ConfigError("data.paths", entry, "the directory holds no file with a known extension "
                              f"({', '.join(EXTENSION_FORMATS)}); give {ALLOWED}")
        return files
    if not os.path.isfile(path):
        raise ConfigError("data.paths", entry, f"no such file or directory; give {ALLOWED}")
    return [path]


def expand_data_paths(entries: list[str]) -> list[str]:
    """Returns the files ``data.paths`` names: ``~``, globs and directories expanded, duplicates dropped."""
    files: list[str] = []
    seen: set[str] = set()
    for entry in entries:
        for path in _expand_entry(str(entry)):
            real = os.path.realpath(path)
            if real not in seen:
                seen.add(real)
                files.append(path)
    return files


def resolve_format(files: list[str], fmt: str) -> str:
    """Returns the ``load_dataset`` builder name for `files`: `fmt`, or by extension when ``auto``."""
    if fmt != "auto":
        if fmt not in FORMATS:
            raise ConfigError("data.format", fmt, f"must be one of {('auto', *FORMATS)}")
        return fmt
    found = {EXTENSION_FORMATS.get(Path(f).suffix.lower()) for f in files}
    if None in found:
        unknown = sorted({Path(f).suffix for f in files if Path(f).suffix.lower() not in EXTENSION_FORMATS})
        raise ConfigError(
            "data.format",
            fmt,
            f"cannot tell the format of extension(s) {unknown} in data.paths; known: "
            f"{sorted(EXTENSION_FORMATS)}; set data.format to one of {FORMATS}",
        )
    if len(found) > 1:
        by_format = {kind: next(f for f in files if EXTENSION_FORMATS.get(Path(f).suffix.lower()) == kind)
                     for kind in sorted(found, key=str)}
        examples = ", ".join(f"{kind} ({Path(f).name})" for kind, f in by_format.items())
        raise ConfigError("data.paths", files if len(files) <= 4 else f"{len(files)} files",
                          f"mixes formats {examples}; use files of one format")
    return found.pop()
