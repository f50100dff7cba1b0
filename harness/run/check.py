"""The throughput regression check: each method's speedup over vanilla against a committed baseline.

Speedups are ratios measured interleaved in one run, so they survive a noisy machine where
absolute img/s would not; a regression is a speedup below baseline * (1 - tolerance).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.run.records import REFERENCE, read_records, read_rows, write_csv_atomically
from methods.errors import TokenBenchError

KEY = ["model", "method", "method_options", "resolution", "device", "precision"]
# Axes added later: a baseline that has them is matched on them too; an older one, written when a run
# had one batch size and mode, is matched without them. The checkpoint (its file name) tells apart rows of
# one method measured on other weights in one folder.
OPTIONAL_KEY = ["batch_size_requested", "model_dtype", "cuda_graphs", "compile", "checkpoint"]
BASELINE_COLUMNS = [*KEY, "keep_rate", "speedup"]


@dataclass(frozen=True)
class CheckResult:
    compared: int
    regressions: list[str]
    missing: list[str]

    @property
    def passed(self) -> bool:
        return not self.regressions and not self.missing


def describe(row: pd.Series) -> str:
    batch = f" batch {row['batch_size_requested']}" if "batch_size_requested" in row else ""
    weights = f" weights {row['checkpoint']}" if row.get("checkpoint") else ""
    where = f"{row['device']}/{row['precision']}"
    return f"{row['method']} keep={row['keep_rate']:g} @{row['resolution']}{batch} {where}{weights}"


def key_columns(baseline: pd.DataFrame, measured: pd.DataFrame) -> list[str]:
    return [*KEY, "keep_rate", *(c for c in OPTIONAL_KEY if c in baseline and c in measured)]


def as_key_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Batch sizes read back as ints or strings ("max") alike: compare them as text. A checkpoint by its file
    name: a baseline committed on one machine is checked on others, where the weights live elsewhere."""
    frame = frame.copy()
    if "batch_size_requested" in frame:
        frame["batch_size_requested"] = frame["batch_size_requested"].astype(str)
    if "checkpoint" in frame:  # no checkpoint: an empty cell, read as NaN
        frame["checkpoint"] = [
            Path(path).name if path else "" for path in frame["checkpoint"].astype(object).fillna("")
        ]
    return frame


def check_run(run: str | Path, baseline: str | Path, tolerance: float = 0.10) -> CheckResult:
    if not 0 <= tolerance < 1:
        raise TokenBenchError(f"tolerance must be in [0, 1), got {tolerance}")
    if not Path(baseline).is_file():
        raise TokenBenchError(f"no baseline at {baseline}: write one with `bench check RUN --baseline FILE --update`")
    expected = as_key_types(read_rows(Path(baseline), BASELINE_COLUMNS, "baseline"))
    measured = as_key_types(read_records(run))
    on = key_columns(expected, measured)
    ambiguous = measured[measured.duplicated(on, keep=False)]
    if not ambiguous.empty:
        lacking = [column for column in OPTIONAL_KEY if column not in expected and column in measured]
        if not lacking:
            raise TokenBenchError(
                f"the run holds several rows of {describe(ambiguous.iloc[0])}: check each from its own folder"
            )
        raise TokenBenchError(
            f"the baseline matches {describe(ambiguous.iloc[0])} to several rows of the run (it lacks the columns "
            f"{', '.join(lacking)}): write it again with --update from a run of one batch size, mode and checkpoint"
        )
    merged = expected.merge(measured[[*on, "speedup"]], on=on, how="left", suffixes=("", "_run"))
    merged = merged[merged["method"] != REFERENCE]
    regressions, missing = [], []
    for _, row in merged.iterrows():
        if pd.isna(row["speedup_run"]):
            missing.append(f"{describe(row)}: in the baseline but not measured in this run")
        elif row["speedup_run"] < row["speedup"] * (1 - tolerance):
            regressions.append(
                f"{describe(row)}: speedup {row['speedup_run']:.3f} < baseline {row['speedup']:.3f} "
                f"- {tolerance:.0%} (= {row['speedup'] * (1 - tolerance):.3f})"
            )
    return CheckResult(compared=len(merged) - len(missing), regressions=regressions, missing=missing)


def update_baseline(run: str | Path, baseline: str | Path) -> int:
    """Write the run's speedups as the new baseline; returns the number of rows written."""
    records = read_records(run, also=BASELINE_COLUMNS)
    rows = records[[*BASELINE_COLUMNS, *(c for c in OPTIONAL_KEY if c in records)]]
    path = Path(baseline)
    if path.is_dir():
        raise TokenBenchError(f"--baseline {path} is a folder: give the path of a CSV file")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv_atomically(rows, path)
    return len(rows)
