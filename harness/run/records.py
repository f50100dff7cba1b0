"""The records of a run: one row per configuration, written atomically as soon as it is measured.

A run is a folder holding `records.csv`, and `run.json`: the settings all its rows share. Every
append rewrites the file through a temporary file and an atomic rename, so an interrupted sweep
leaves the rows it finished and never a torn file; `done_keys` lets the next run of the same
command skip them.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import pandas as pd

from methods.errors import TokenBenchError

RECORDS_FILE = "records.csv"
SETTINGS_FILE = "run.json"  # what every row of the folder shares (`RunStore.check_settings`)
LOCK_FILE = ".lock"  # held by the one run writing to the folder (`RunStore.claim`)
# The settings that are paths, and the key of run.json that holds a fingerprint of the files behind each.
FINGERPRINTS = {"data": "data_files", "labels_csv": "labels_csv_file", "real_labels": "real_labels_file"}
CHECKPOINT_FILES = "checkpoint_files"  # {path: digest of its bytes} of every checkpoint the folder's rows used
REFERENCE = "vanilla"  # the method every row is compared with, measured once per (model, resolution, batch size)


def write_csv_atomically(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` to `path` so that readers see the old file or the new one, never a part."""
    write_atomically(path, lambda stream: frame.to_csv(stream, index=False))


def write_text_atomically(text: str, path: Path) -> None:
    write_atomically(path, lambda stream: stream.write(text))


def write_atomically(path: Path, write: Callable[[TextIO], object]) -> None:
    """Write through a temporary file in the same folder and an atomic rename. The file gets the mode
    an ordinary open() would give it (0666 less the umask): mkstemp's 0600 would hide results from
    colleagues on a shared machine."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(handle, 0o666 & ~current_umask())
        with os.fdopen(handle, "w", newline="") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def current_umask() -> int:
    """The process's umask; reading it means setting it, so it is set straight back."""
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


class RunStore:
    """The rows of one run folder."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / RECORDS_FILE
        self._rows = self.load_rows()
        self._lock: TextIO | None = None

    def load_rows(self) -> list[dict[str, Any]]:
        rows = read_table(self.path, ["config_key"], "records") if self.path.exists() else pd.DataFrame()
        return rows.to_dict("records")  # a resume needs their keys only

    @staticmethod
    def prepare(run_dir: str | Path) -> RunStore:
        """Create the run folder if needed and check it is writable before anything is measured."""
        folder = Path(run_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-", delete=True)
            probe.close()
        except OSError as error:
            raise TokenBenchError(f"cannot write to output folder {folder}: {error.strerror}") from None
        return RunStore(folder)

    def claim(self) -> None:
        """Hold the folder for this process until `release`, then read its rows afresh. Each append rewrites
        records.csv from the rows this process knows, so two runs writing to one folder at once would each
        drop the other's rows. The lock is the system's (flock): a run that is killed leaves none behind."""
        import fcntl  # POSIX only: imported here so that reading records needs no lock

        lock = open(self.run_dir / LOCK_FILE, "a")  # noqa: SIM115  (held open until release)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            lock.close()
            if isinstance(error, BlockingIOError):  # held by another process
                raise TokenBenchError(
                    f"another bench run is writing to {self.run_dir}: wait for it to finish, or give another --out"
                ) from None
            raise TokenBenchError(f"cannot lock {lock.name} (the one run writing there): {error.strerror}") from None
        self._lock = lock
        self._rows = self.load_rows()

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def check_settings(self, settings: dict[str, Any]) -> None:
        """Record the settings every row of this folder shares (run.json) on its first run; refuse a later
        run that asks for other ones while the folder holds rows. A folder from before run.json, or before
        one of its settings, takes the settings it is given (and records them). Checkpoints are compared
        path by path: a later run may bring weights for another method, not other weights under a path."""
        path = self.run_dir / SETTINGS_FILE
        stored = self.stored_settings() if path.is_file() and self._rows else {}
        checkpoints = {**settings.get(CHECKPOINT_FILES, {}), **stored.get(CHECKPOINT_FILES, {})}
        saved_over = [
            name for name, digest in settings.get(CHECKPOINT_FILES, {}).items() if checkpoints[name] != digest
        ]
        changed = [
            name for name in settings if name in stored and name != CHECKPOINT_FILES and stored[name] != settings[name]
        ]
        if changed or saved_over:
            raise TokenBenchError(
                f"{self.run_dir} holds rows measured with {describe_settings(changed, saved_over, stored, settings)}"
            )
        merged = {**stored, **settings, **({CHECKPOINT_FILES: checkpoints} if CHECKPOINT_FILES in settings else {})}
        if merged != stored:
            write_text_atomically(json.dumps(merged, indent=2, sort_keys=True), path)

    def stored_settings(self) -> dict[str, Any]:
        path = self.run_dir / SETTINGS_FILE
        try:
            stored = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            stored = error
        if not isinstance(stored, dict):
            raise TokenBenchError(
                f"cannot read {path}, the settings its rows were measured with ({stored}): restore it, or delete "
                f"it to have this run's settings recorded in its place"
            )
        return stored

    def done_keys(self) -> set[str]:
        return {row["config_key"] for row in self._rows}

    def append(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        write_csv_atomically(pd.DataFrame(self._rows), self.path)


def describe_settings(changed: Sequence[str], saved_over: Sequence[str], stored: dict, asked: dict) -> str:
    """What differs, and what to do. Settings: 'name=held; this run asks for name=asked'. Where only files
    changed behind the same paths (another limit or labels file changes the data's fingerprint too, but says
    more), which paths; the same files copied anew (modification times reset) keep their fingerprints."""
    paths = {fingerprint: name for name, fingerprint in FINGERPRINTS.items()}
    values = [name for name in changed if name not in paths]
    if values:
        held = ", ".join(f"{name}={stored.get(name)!r}" for name in values)
        asks = ", ".join(f"{name}={asked[name]!r}" for name in values)
        return (
            f"{held}; this run asks for {asks}: run with the folder's settings, or give another --out (a folder "
            f"holds one setting of these, so that each row is compared with its own vanilla)"
        )
    files = [f"{paths[name]}={asked[paths[name]]!r}" for name in changed] + [
        f"checkpoint {name}" for name in saved_over
    ]
    return (
        f"other files behind {', '.join(files)} (images added, removed or resized; labels or weights changed): "
        f"give another --out, or, to measure the rest on the files as they are now beside the rows measured "
        f"before, delete {SETTINGS_FILE} there"
    )


# What report, plot and check read from every record; older records lack some later columns, which
# `report.with_group_columns` fills in.
RECORD_COLUMNS = ["model", "method", "keep_rate", "resolution", "device", "precision", "batch_size", "gmacs"]
RECORD_COLUMNS += ["img_per_s", "speedup", "config_key"]
# Read as numbers wherever a records file or baseline holds them: a stray text cell would otherwise
# surface as a TypeError deep inside report, plot or check. Empty cells (no --data: no top-1) are NaN.
NUMERIC_COLUMNS = ["keep_rate", "resolution", "batch_size", "oom_halvings", "macs", "gmacs", "img_per_s"]
NUMERIC_COLUMNS += ["img_per_s_min", "img_per_s_max", "img_per_s_iqr", "reference_img_per_s", "speedup"]
NUMERIC_COLUMNS += ["floor_img_per_s", "floor_speedup", "top1", "top5", "images", "skipped", "top1_real"]
NUMERIC_COLUMNS += ["real_images", "eval_img_per_s", "decode_s"]


def read_records(run: str | Path, also: Sequence[str] = ()) -> pd.DataFrame:
    """The records of a run folder (or of a records CSV given directly), holding RECORD_COLUMNS and `also`."""
    path = Path(run)
    if path.is_dir():
        path = path / RECORDS_FILE
    if not path.is_file():
        raise TokenBenchError(f"no records at {path}: run `bench run --out {Path(run)}` first")
    return read_rows(path, [*RECORD_COLUMNS, *also], "records")


def output_path(run: str | Path, name: str) -> Path:
    """Where report and plot write the file `name`: in the run folder, or beside a records CSV given
    directly. A CSV named other than records.csv puts its stem before the name (gpu.csv: gpu.report.csv,
    .gpu.figures.json), so that two CSVs in one folder keep their own outputs."""
    path = Path(run)
    if not path.is_file():
        return path / name
    if path.name == RECORDS_FILE:
        return path.parent / name
    dot = "." if name.startswith(".") else ""
    return path.parent / f"{dot}{path.stem}.{name.removeprefix(dot)}"


def read_rows(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """`read_table` for the tools that read results (report, plot, check): at least one row, and the
    NUMERIC_COLUMNS it holds as numbers, or one error naming the column and the first line that is not."""
    frame = read_table(path, columns, what)
    if frame.empty:
        raise TokenBenchError(f"no rows in {what} {path}: it holds only its header")
    for column in NUMERIC_COLUMNS:
        if column in frame:
            frame[column] = as_numbers(frame[column], path, what)
    return frame


def as_numbers(values: pd.Series, path: Path, what: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    text = values.notna() & numbers.isna()
    if text.any():
        row = int(text.to_numpy().argmax())
        raise TokenBenchError(
            f"{what} {path}: column {values.name} holds {values.iloc[row]!r} on line {row + 2}, not a number"
        )
    return numbers


def read_table(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    """A CSV that must hold `columns`; one clear error for an empty, malformed or foreign file."""
    try:
        frame = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as error:
        raise TokenBenchError(f"cannot read {what} {path}: {str(error).strip().splitlines()[0]}") from None
    missing = [column for column in columns if column not in frame]
    if missing:
        raise TokenBenchError(f"{what} {path} lack the columns {', '.join(missing)}: not tokenbench {what}?")
    return frame
