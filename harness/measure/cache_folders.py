"""The decode cache's folders on disk: what each holds, when it was last used, and removing them.

A cache is about 150 KB an image (7.5 GB for ImageNet's validation set at 224), one per set of files
and preprocessing, so they add up: a resolution or a model with another crop makes a new one, and a
changed file makes a new one that the old can never be served for again. So a new cache removes the
caches it supersedes (the same files, in the same order, with the same preprocessing, but older
contents, written on the same host), reading one marks it used, and `bench cache` lists them and
removes the unused ones.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from methods.errors import TokenBenchError

PIXELS, INDEX = "pixels.npy", "index.json"
PARTIAL = ".partial"  # the suffix of a folder still being decoded


@dataclass(frozen=True)
class CacheFolder:
    """One complete cache: its folder, images, bytes on disk, when it was last read or written (seconds
    since the epoch), the common folder of its files, and its preprocessing's description."""

    path: Path
    images: int
    bytes: int
    last_used: float
    root: str
    preprocessing: str


def read_index(folder: Path) -> dict | None:
    """A complete cache's index, or None for anything else (a partial folder, a stray file, a torn index)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and (folder / PIXELS).is_file() else None


def mark_used(folder: Path) -> None:
    """Record a read as the cache's last use (the index's modification time). A cache folder shared
    read-only is still served; it is just not marked."""
    try:
        os.utime(folder / INDEX)
    except OSError:
        pass


def list_caches(cache_dir: Path) -> list[CacheFolder]:
    """The complete caches in `cache_dir`, most recently used first (none where the folder does not exist).
    A cache that cannot be read (another user's, in a shared folder) is left out, with a warning."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise TokenBenchError(f"cache folder {cache_dir} is a file: give --cache-dir a folder")
    if not cache_dir.is_dir():
        return []
    try:
        entries = list(cache_dir.iterdir())
    except OSError as error:
        raise TokenBenchError(f"cannot read cache folder {cache_dir}: {error.strerror}") from None
    caches, unreadable = [], []
    for folder in entries:
        index = read_index(folder) if folder.is_dir() and not folder.name.startswith(".") else None
        try:
            if index is not None:
                caches.append(
                    CacheFolder(
                        path=folder,
                        images=int(index.get("images", 0)),
                        bytes=sum(entry.stat().st_size for entry in folder.iterdir() if entry.is_file()),
                        last_used=(folder / INDEX).stat().st_mtime,
                        root=str(index.get("root", "?")),
                        preprocessing=str(index.get("preprocessing", "?")),
                    )
                )
        except FileNotFoundError:  # removed meanwhile by another process
            continue
        except OSError as error:
            unreadable.append(f"{folder.name} ({error.strerror})")
    if unreadable:
        warnings.warn(f"left out the caches of {cache_dir} that cannot be read: {', '.join(unreadable)}", stacklevel=2)
    return sorted(caches, key=lambda cache: cache.last_used, reverse=True)


def remove_caches(cache_dir: Path, unused_days: float | None = None) -> list[CacheFolder]:
    """Remove the caches of `cache_dir` not used for `unused_days` days (None: every one), and the folders
    that killed decodes on this host left behind; returns the caches removed. One that cannot be removed
    (another user's, in a shared folder) stays, with a warning."""
    cutoff = None if unused_days is None else time.time() - unused_days * 86400
    removed, kept = [], []
    for cache in list_caches(cache_dir):
        if cutoff is None or cache.last_used < cutoff:
            shutil.rmtree(cache.path, ignore_errors=True)
            (kept if cache.path.exists() else removed).append(cache)
    if kept:
        names = ", ".join(cache.path.name for cache in kept)
        warnings.warn(
            f"could not remove the caches {names} of {cache_dir}: check their owner and permissions", stacklevel=2
        )
    if cache_dir.is_dir():
        for partial in cache_dir.glob(f".*{PARTIAL}"):
            remove_if_abandoned(partial)
    return removed


def remove_superseded(folder: Path, source: str) -> None:
    """Remove the other caches of the same files and preprocessing (`source`) written on this host: their
    files have changed since, so this host can never ask for their keys again. Another host sharing the
    folder may hold other copies of the files at the same paths, so its caches stay."""
    for other in folder.parent.iterdir():
        if other == folder or other.name.startswith(".") or not other.is_dir():
            continue  # the new cache, a folder still being written, a stray file
        index = read_index(other)
        if index is not None and index.get("source") == source and index.get("host") == socket.gethostname():
            shutil.rmtree(other, ignore_errors=True)


def partial_folder_prefix(folder: Path) -> str:
    """How the names of `folder`'s temporary folders on this host begin; the writing process's pid follows."""
    return f".{folder.name}.{socket.gethostname()}."


def remove_abandoned(folder: Path) -> None:
    """Delete the temporary folders of `folder`'s cache whose process, on this host, is gone."""
    for partial in folder.parent.glob(glob.escape(partial_folder_prefix(folder)) + "*" + PARTIAL):
        remove_if_abandoned(partial)


def remove_if_abandoned(partial: Path) -> None:
    """Delete a temporary folder whose process, on this host, is gone: a run killed mid-decode (SIGKILL,
    power loss) never reached its own clean-up, and each is as large as the cache. A folder of another
    host, or of a live process, may still be written, and stays. Name: .KEY.HOST.PID.NONCE.partial"""
    parts = partial.name[1:].split(".")
    if len(parts) < 5 or ".".join(parts[1:-3]) != socket.gethostname():
        return
    pid = parts[-3]
    if pid.isdigit() and not process_alive(int(pid)):
        shutil.rmtree(partial, ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
