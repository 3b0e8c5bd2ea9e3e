"""Digests of files: what verifies a download (md5, the datasets' published sums) and what names a
teacher's weight file in its provenance (sha256), read in 1 MiB blocks so large files cost no memory."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    """The hex digest of the file's bytes with `algorithm` (any name hashlib knows)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
