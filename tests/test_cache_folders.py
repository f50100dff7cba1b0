"""The decode cache's folders: a superseded cache goes, the rest are listed and removed on request."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner
from PIL import Image

from bench import cli
from harness.measure.cache_folders import INDEX, list_caches, remove_caches
from harness.measure.data import load_imagenet_folder
from harness.measure.decode_cache import decode, preprocessing_for
from tests.conftest import tiny_vit
from tests.test_accuracy import CLASSES, noise_tree

DAY = 86400


def decode_set(tmp_path, rows=None, size=64):
    """Decode the noise folder tmp_path/val (made once) into tmp_path/cache -> the cache's folder."""
    root = tmp_path / "val"
    dataset = load_imagenet_folder(root if root.is_dir() else noise_tree(root, corrupt=False), None)
    rows = range(len(dataset)) if rows is None else rows
    decode(dataset, rows, preprocessing_for(tiny_vit(num_classes=CLASSES), size), cache_dir=tmp_path / "cache")
    return dataset


def cache_names(tmp_path):
    return sorted(cache.path.name for cache in list_caches(tmp_path / "cache"))


def rewrite(path):
    """The same picture saved again: another size, a later time."""
    stat = path.stat()
    Image.open(path).convert("RGB").save(path, format="PNG")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))


def test_a_changed_file_s_new_cache_removes_the_one_it_supersedes_only(tmp_path):
    dataset = decode_set(tmp_path)
    decode_set(tmp_path, rows=range(10))  # other files: a subset
    decode_set(tmp_path, size=48)  # other preprocessing
    before = cache_names(tmp_path)
    assert len(before) == 3
    rewrite(dataset.samples[3][0])
    decode_set(tmp_path)
    after = cache_names(tmp_path)
    assert len(after) == 3 and len(set(before) - set(after)) == 1  # one replaced, the others kept
    decode_set(tmp_path, rows=range(10))
    decode_set(tmp_path, size=48)
    assert len(cache_names(tmp_path)) == 3  # they were current: nothing re-decoded, nothing added


def test_another_host_s_cache_of_the_same_paths_is_not_superseded(tmp_path):
    """A cache folder shared by hosts, each with its own copy of the data at the same paths (other times):
    removing each other's caches would decode 7.5 GB at every switch."""
    dataset = decode_set(tmp_path)
    (other,) = list_caches(tmp_path / "cache")
    index = json.loads((other.path / INDEX).read_text())
    (other.path / INDEX).write_text(json.dumps({**index, "host": "another-host"}))
    rewrite(dataset.samples[3][0])
    decode_set(tmp_path)
    assert other.path in {cache.path for cache in list_caches(tmp_path / "cache")}
    assert len(cache_names(tmp_path)) == 2


def test_a_cache_without_a_source_is_never_taken_for_a_superseded_one(tmp_path):
    """Caches written before their index named a source are left to `bench cache clear`."""
    dataset = decode_set(tmp_path)
    (old,) = list_caches(tmp_path / "cache")
    index = json.loads((old.path / INDEX).read_text())
    del index["source"], index["root"]
    (old.path / INDEX).write_text(json.dumps(index))
    rewrite(dataset.samples[0][0])
    decode_set(tmp_path)
    caches = list_caches(tmp_path / "cache")
    assert len(caches) == 2 and old.path.name in {cache.path.name for cache in caches}
    assert {cache.root for cache in caches} == {"?", str((tmp_path / "val").resolve())}


def test_the_list_holds_what_each_cache_is_most_recently_used_first(tmp_path):
    decode_set(tmp_path, rows=range(10))
    decode_set(tmp_path, rows=range(5), size=48)
    for cache in list_caches(tmp_path / "cache"):
        os.utime(cache.path / INDEX, (time.time() - DAY, time.time() - DAY))
    decode_set(tmp_path, rows=range(10))  # read again: used now
    first, second = list_caches(tmp_path / "cache")
    assert (first.images, second.images) == (10, 5)
    assert first.last_used > time.time() - 60 > second.last_used
    assert first.bytes == sum(entry.stat().st_size for entry in first.path.iterdir()) > 10 * 3 * 64 * 64
    assert first.root == str((tmp_path / "val").resolve())
    assert "Resize" in first.preprocessing and "CenterCrop(size=(48, 48))" in second.preprocessing


def test_clear_removes_the_unused_caches_and_abandoned_folders(tmp_path):
    decode_set(tmp_path, rows=range(10))
    decode_set(tmp_path, rows=range(5))
    cache = tmp_path / "cache"
    stale, fresh = sorted(list_caches(cache), key=lambda cache: cache.images)
    os.utime(stale.path / INDEX, (time.time() - 40 * DAY, time.time() - 40 * DAY))
    exited = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    abandoned = cache / f".{'1' * 32}.{host}.{int(exited.stdout)}.0a1b2c3d.partial"
    live = cache / f".{'2' * 32}.{host}.{os.getpid()}.0a1b2c3d.partial"
    for folder in (abandoned, live):
        folder.mkdir()
    assert [removed.path for removed in remove_caches(cache, unused_days=30)] == [stale.path]
    assert [kept.path for kept in list_caches(cache)] == [fresh.path]
    assert not abandoned.exists() and live.exists()
    assert [removed.path for removed in remove_caches(cache)] == [fresh.path]
    assert list_caches(cache) == []


def test_bench_cache_lists_and_clears(tmp_path):
    decode_set(tmp_path, rows=range(10))
    folder = str(tmp_path / "cache")
    listed = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", folder])
    assert listed.exit_code == 0, listed.output
    (cache,) = list_caches(tmp_path / "cache")
    assert f"{cache.path.name}  0.00 GB  10 images  used " in listed.output
    assert len(listed.output.strip().splitlines()) == 2  # the cache's line (its preprocessing on it), the total
    assert listed.output.strip().endswith(f"1 caches, 0.00 GB in {folder}")
    cleared = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", folder, "--unused-for", "1"])
    assert cleared.exit_code == 0 and cleared.output.strip() == "removed 0 caches, 0.00 GB"
    cleared = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", folder])
    assert cleared.exit_code == 0 and cleared.output.startswith(f"removed {cache.path}  ")
    assert list_caches(tmp_path / "cache") == []
    refused = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", folder, "--unused-for", "-2"])
    assert refused.exit_code == 2 and "Invalid value for '--unused-for'" in refused.output


def refuse(monkeypatch, method, path):
    """Make Path.`method` raise PermissionError on `path`, as for another user's folder (the tests run as root)."""
    original = getattr(Path, method)

    def guarded(self, *args, **kwargs):
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, guarded)


def test_a_cache_that_cannot_be_read_is_left_out_with_a_warning(tmp_path, monkeypatch):
    decode_set(tmp_path, rows=range(10))
    decode_set(tmp_path, rows=range(5))
    theirs, mine = list_caches(tmp_path / "cache")
    refuse(monkeypatch, "iterdir", theirs.path)
    listed = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", str(tmp_path / "cache")])
    assert listed.exit_code == 0, listed.output
    warning = f"warning: left out the caches of {tmp_path / 'cache'} that cannot be read: {theirs.path.name} "
    assert warning in listed.output
    assert mine.path.name in listed.output and "1 caches" in listed.output


def test_an_unreadable_cache_folder_is_one_error_line(tmp_path, monkeypatch):
    decode_set(tmp_path, rows=range(5))
    refuse(monkeypatch, "iterdir", tmp_path / "cache")
    listed = CliRunner().invoke(cli, ["cache", "list", "--cache-dir", str(tmp_path / "cache")])
    assert listed.exit_code == 2
    assert f"cannot read cache folder {tmp_path / 'cache'}: Permission denied" in listed.output


def test_clear_reports_only_what_it_removed(tmp_path, monkeypatch):
    decode_set(tmp_path, rows=range(10))
    decode_set(tmp_path, rows=range(5))
    theirs, mine = list_caches(tmp_path / "cache")
    rmtree = shutil.rmtree  # fails quietly (ignore_errors) on another user's folder
    monkeypatch.setattr(shutil, "rmtree", lambda path, **kwargs: path == theirs.path or rmtree(path, **kwargs))
    cleared = CliRunner().invoke(cli, ["cache", "clear", "--cache-dir", str(tmp_path / "cache")])
    assert cleared.exit_code == 0, cleared.output
    assert f"could not remove the caches {theirs.path.name} of " in cleared.output
    assert f"removed {mine.path}  " in cleared.output and str(theirs.path) + "  " not in cleared.output
    assert "removed 1 caches" in cleared.output and theirs.path.exists()
