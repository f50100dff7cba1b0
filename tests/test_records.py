"""Run records: written atomically, readable by whoever the umask lets read an ordinary file."""

import errno
import json
import os
import stat
import subprocess
import sys

import pandas as pd
import pytest

from harness.measure.fingerprint import files_fingerprint
from harness.run.records import (
    CHECKPOINT_FILES,
    FINGERPRINTS,
    LOCK_FILE,
    RunStore,
    write_csv_atomically,
    write_text_atomically,
)
from methods import TokenBenchError


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield lambda mask: os.umask(mask)
    os.umask(saved)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_mode_an_ordinary_open_would_give(tmp_path, umask, mask, expected):
    umask(mask)
    (tmp_path / "plain.txt").write_text("x")  # what open() gives, the independent yardstick
    write_csv_atomically(pd.DataFrame({"a": [1]}), tmp_path / "records.csv")
    write_text_atomically("# report\n", tmp_path / "report.md")
    assert mode(tmp_path / "plain.txt") == expected
    assert mode(tmp_path / "records.csv") == expected and mode(tmp_path / "report.md") == expected


def test_appended_rows_are_all_kept_and_no_temporary_file_is_left(tmp_path):
    store = RunStore.prepare(tmp_path)
    for i in range(3):
        store.append({"config_key": f"k{i}", "value": i})
    assert pd.read_csv(tmp_path / "records.csv")["value"].tolist() == [0, 1, 2]
    assert RunStore(tmp_path).done_keys() == {"k0", "k1", "k2"}
    assert not list(tmp_path.glob(".*.tmp"))


def test_shared_settings_bind_a_folder_once_it_holds_rows(tmp_path):
    """A first run stopped before its first row (Ctrl-C in a long decode) binds nothing."""
    store = RunStore.prepare(tmp_path)
    store.check_settings({"limit": 4})
    store.check_settings({"limit": 6})
    store.append({"config_key": "k0"})
    with pytest.raises(TokenBenchError, match="holds rows measured with limit=6; this run asks for limit=4"):
        RunStore(tmp_path).check_settings({"limit": 4})
    RunStore(tmp_path).check_settings({"limit": 6})


def test_one_run_at_a_time_writes_a_folder_and_it_starts_from_the_rows_on_disk(tmp_path):
    """Each append rewrites records.csv from the rows its process knows: two writers at once would drop each
    other's rows. The second is refused until the first releases the folder; a claim reads the rows afresh."""
    first, second = RunStore.prepare(tmp_path), RunStore(tmp_path)
    first.claim()
    with pytest.raises(TokenBenchError, match=f"another bench run is writing to {tmp_path}: wait for it"):
        second.claim()
    first.append({"config_key": "k0"})
    first.release()
    second.claim()
    assert second.done_keys() == {"k0"}  # not the empty folder it saw when it was made
    second.append({"config_key": "k1"})
    second.release()
    assert RunStore(tmp_path).done_keys() == {"k0", "k1"}


HOLD_LOCK = (  # another process's lock on the folder, taken with the system's own call
    "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); "
    "print('held', flush=True); time.sleep(60)"
)


def test_a_folder_held_by_another_process_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path / LOCK_FILE)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(TokenBenchError, match="another bench run is writing to"):
            RunStore.prepare(tmp_path).claim()
    finally:
        holder.kill()
        holder.wait()
    store = RunStore(tmp_path)
    store.claim()  # the killed holder left no lock behind
    store.release()


def test_new_files_behind_the_same_path_are_another_setting(tmp_path):
    """A setting that an older run.json lacks is taken and recorded; a fingerprint that differs is refused,
    worded as the files that changed behind the path."""
    store = RunStore.prepare(tmp_path)
    store.check_settings({"data": "/val"})
    store.append({"config_key": "k0"})
    RunStore(tmp_path).check_settings({"data": "/val", FINGERPRINTS["data"]: "abc"})
    assert json.loads((tmp_path / "run.json").read_text()) == {"data": "/val", FINGERPRINTS["data"]: "abc"}
    with pytest.raises(TokenBenchError, match=r"measured with other files behind data='/val' \(images added"):
        RunStore(tmp_path).check_settings({"data": "/val", FINGERPRINTS["data"]: "abd"})


def test_checkpoints_are_compared_path_by_path(tmp_path):
    """A later run may bring weights for another method; not other weights under a path the rows used."""
    store = RunStore.prepare(tmp_path)
    store.check_settings({CHECKPOINT_FILES: {"/w/a.pth": "1"}})
    store.append({"config_key": "k0"})
    RunStore(tmp_path).check_settings({CHECKPOINT_FILES: {"/w/b.pth": "2"}})
    assert json.loads((tmp_path / "run.json").read_text()) == {CHECKPOINT_FILES: {"/w/a.pth": "1", "/w/b.pth": "2"}}
    with pytest.raises(TokenBenchError, match="other files behind checkpoint /w/a.pth .*delete run.json there"):
        RunStore(tmp_path).check_settings({CHECKPOINT_FILES: {"/w/a.pth": "3"}})  # a run that did not name it kept it
    with pytest.raises(TokenBenchError, match="other files behind checkpoint /w/b.pth"):
        RunStore(tmp_path).check_settings({CHECKPOINT_FILES: {"/w/a.pth": "1", "/w/b.pth": "3"}})


def test_a_lock_that_cannot_be_taken_is_not_taken_for_another_run(tmp_path, monkeypatch):
    """A file system without flock (some network mounts) says so, rather than blaming a run that is not there."""
    import fcntl

    def no_locks(*_args):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(TokenBenchError, match="cannot lock .*.lock .*: No locks available"):
        RunStore.prepare(tmp_path).claim()


@pytest.mark.parametrize("text", ['{"data": nul', "[1, 2]", "\x97\x98"])
def test_an_unreadable_run_json_is_one_clear_error(tmp_path, text):
    store = RunStore.prepare(tmp_path)
    store.append({"config_key": "k0"})
    (tmp_path / "run.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(TokenBenchError, match="cannot read .*run.json, the settings its rows were measured with"):
        RunStore(tmp_path).check_settings({"limit": 4})


def test_the_images_fingerprint_follows_names_and_sizes_not_times(tmp_path):
    for name in ("a.JPEG", "b.JPEG"):
        (tmp_path / name).write_bytes(b"x" * 10)
    files = sorted(tmp_path.glob("*.JPEG"))
    before = files_fingerprint(files, tmp_path)
    os.utime(files[0], (1e9, 1e9))
    assert files_fingerprint(files, tmp_path) == before  # copied anew
    files[0].write_bytes(b"x" * 11)
    assert files_fingerprint(files, tmp_path) != before  # rewritten at another size
    assert files_fingerprint(files[:1], tmp_path) != files_fingerprint(files, tmp_path)  # one removed
