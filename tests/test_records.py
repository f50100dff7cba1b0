"""Run records: written atomically, readable by whoever the umask lets read an ordinary file."""

import os
import stat

import pandas as pd
import pytest

from harness.run.records import RunStore, write_csv_atomically, write_text_atomically
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
