"""Fingerprints of the files a run reads: a path alone does not say that the images or weights behind it are
the ones a folder's earlier rows were measured on."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from harness.measure.data import load_imagenet_folder


def files_fingerprint(paths: Iterable[str | Path]) -> str:
    """A digest of each file's absolute path, size and modification time: it changes when a file is added,
    removed, renamed or rewritten (reading every byte would cost minutes on ImageNet)."""
    entries = []
    for path in paths:
        absolute = os.path.abspath(path)
        try:
            stat = os.stat(absolute)
            entries.append((absolute, stat.st_size, stat.st_mtime_ns))
        except OSError:
            entries.append((absolute, None, None))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def data_fingerprint(
    data: str | Path, labels_csv: str | Path | None, limit: int | None, real_labels: str | Path | None
) -> str:
    """The fingerprint of the images an evaluation on `data` reads (those `limit` picks) and of its label files."""
    dataset = load_imagenet_folder(data, None, labels_csv=labels_csv, limit=limit, real_labels=real_labels)
    label_files = [path for path in (labels_csv, real_labels) if path is not None]
    return files_fingerprint([*(path for path, _ in dataset.samples), *label_files])
