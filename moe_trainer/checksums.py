"""sha256 of files, read in blocks: how checkpoints and token shards prove they are intact.

Plain reads, never a memory map, so hashing a file of several GB leaves the process's resident
set as it was (a mapped page that was read counts in RSS until the map goes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK_BYTES = 1 << 22


def file_sha256(path: Path) -> str:
    """Hex sha256 of the file's bytes (about 1 s per GB here: the CPU's SHA extensions)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()
