"""Builds a large real-text corpus from Debian documentation packages, for the data benchmarks.

The scale benchmarks need hundreds of MB of real text that any Debian machine can fetch from
its own package mirror (no Hub, no web): the kernel's documentation and sources, the Python,
Java, Rust, C++, Perl and PostgreSQL manuals and the King James Bible. HTML pages are reduced to
their text (tags dropped, entities decoded); reStructuredText, pod, plain text and C sources are
kept as they are. Prose packages come first and the kernel's C sources fill up to
``--max-mb``. One document per file, written as JSON lines (``{"text": ...}``) in files of
about 64 MB, so ``data=files data.paths=[OUT/*.jsonl]`` reads them.

Usage::

    mkdir -p /tmp/debs && (cd /tmp/debs && apt-get download linux-doc-6.1 linux-source-6.1 \\
        openjdk-17-doc rust-doc libstdc++-12-doc python3.11-doc perl-doc postgresql-doc-15 bible-kjv-text)
    python -m benchmarks.debian_corpus /tmp/debs /tmp/debian_corpus --min-mb 500 --max-mb 600

Never run by the tests: it needs the package mirror.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

KEEP_AS_IS = {".txt", ".rst", ".pod", ".md", ".c", ".h"}
HTML = {".html", ".htm"}
_TAG = re.compile(r"<(script|style)\b.*?</\1>|<[^>]+>", re.S | re.I)
_BLANKS = re.compile(r"\n\s*\n\s*\n+")
SHARD_BYTES = 64 << 20
MIN_DOC_CHARS = 200  # navigation pages and stubs carry no prose


def html_text(raw: str) -> str:
    """The readable text of an HTML page: scripts, styles and tags dropped, entities decoded."""
    return _BLANKS.sub("\n\n", html.unescape(_TAG.sub(" ", raw))).strip()


def _documents(root: Path) -> Iterator[str]:
    """Every kept file under `root` as one document's text, in sorted path order."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        suffix = path.suffix.lower()
        if suffix not in KEEP_AS_IS | HTML:
            continue
        raw = path.read_text(encoding="utf-8", errors="replace")
        text = html_text(raw) if suffix in HTML else raw
        if len(text) >= MIN_DOC_CHARS:
            yield text


def _unpack(deb: Path, into: Path) -> Path:
    """Extracts a .deb (and a source tarball it ships, as the kernel source package does)."""
    out = into / deb.stem
    subprocess.run(["dpkg-deb", "-x", str(deb), str(out)], check=True)
    for tarball in out.rglob("*.tar.xz"):
        with tarfile.open(tarball) as tar:
            tar.extractall(tarball.parent / "src", filter="data")
        tarball.unlink()
    return out


def _prose_first(debs: Path) -> list[Path]:
    """The packages in name order, source packages (code, not prose) last."""
    return sorted(debs.glob("*.deb"), key=lambda d: ("-source" in d.name, d.name))


def build(debs: Path, out: Path, min_mb: int, max_mb: int) -> dict[str, int]:
    """Writes the corpus to `out` (stopping once `max_mb` of text is written); returns its size."""
    out.mkdir(parents=True, exist_ok=True)
    docs = written = shard = 0
    handle = (out / f"part{shard:03d}.jsonl").open("w")
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        for deb in _prose_first(debs):
            if written >= max_mb * 1_000_000:
                break
            for text in _documents(_unpack(deb, Path(tmp))):
                if written >= max_mb * 1_000_000:
                    break
                line = json.dumps({"text": text}) + "\n"
                handle.write(line)
                docs += 1
                written += len(text.encode())
                if handle.tell() >= SHARD_BYTES:
                    handle.close()
                    shard += 1
                    handle = (out / f"part{shard:03d}.jsonl").open("w")
            print(f"{deb.name}: {docs} documents, {written / 1e6:.0f} MB of text so far", flush=True)
    handle.close()
    if written < min_mb * 1_000_000:
        raise SystemExit(f"only {written / 1e6:.0f} MB of text; add packages to reach {min_mb} MB")
    return {"documents": docs, "text_bytes": written}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("debs", type=Path, help="directory of downloaded .deb files")
    parser.add_argument("out", type=Path, help="output directory for the *.jsonl files")
    parser.add_argument("--min-mb", type=int, default=500, help="fail below this much text")
    parser.add_argument("--max-mb", type=int, default=600, help="stop once this much text is written")
    args = parser.parse_args(argv)
    print(json.dumps(build(args.debs, args.out, args.min_mb, args.max_mb)))


if __name__ == "__main__":
    main()
