"""The one file digest: checkpoints, data files and converted models are recognised by it."""

from __future__ import annotations

import hashlib


def file_sha256(path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
