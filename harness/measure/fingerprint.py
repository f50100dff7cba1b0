"""Fingerprints of the files a run reads: a path alone does not say that the images, labels or weights behind
it are the ones a folder's earlier rows were measured on."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

CHUNK = 1 << 23  # bytes read at a time to hash a checkpoint


def files_fingerprint(paths: Iterable[str | Path], root: str | Path) -> str:
    """A digest of each file's path under `root` and its size: it changes when a file is added, removed,
    renamed or rewritten to another size, and not when the same files are copied anew (a job staging its
    data, which resets modification times). Reading every image would cost minutes on ImageNet."""
    entries = []
    for path in paths:
        try:
            size = os.stat(path).st_size
        except OSError:
            size = None
        entries.append((os.path.relpath(path, root), size))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def content_digest(path: str | Path) -> str:
    """A digest of the file's bytes: weights saved over a checkpoint keep its size (the same architecture)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()[:16]
