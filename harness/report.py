"""Tables from a run's records: per resolution, each configuration against the vanilla reference."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.records import REFERENCE, read_records, write_csv_atomically
from methods.errors import TokenBenchError

COLUMNS = [
    "resolution",
    "method",
    "keep_rate",
    "gmacs",
    "mac_reduction_pct",
    "img_per_s",
    "speedup",
    "ideal_speedup",
    "pct_of_ideal",
    "top1",
    "top1_delta",
    "top5",
]


def build_report(records: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, with MAC reduction and top-1 change against vanilla at its resolution.

    `speedup` is the ratio of medians measured interleaved with vanilla in the same run, which holds
    on noisy machines where img/s across rows would not. `ideal_speedup` is the MAC ratio, what the
    method would gain if time followed MACs; `pct_of_ideal` says how much of it the method gets.
    """
    frames = []
    for resolution, group in records.groupby("resolution", sort=True):
        reference = group[group["method"] == REFERENCE]
        if reference.empty:
            raise TokenBenchError(f"no vanilla row at resolution {resolution}: the report compares against it")
        base = reference.iloc[0]
        frame = group.copy()
        frame["mac_reduction_pct"] = 100 * (1 - frame["gmacs"] / base["gmacs"])
        frame["ideal_speedup"] = base["gmacs"] / frame["gmacs"]
        frame["pct_of_ideal"] = 100 * frame["speedup"] / frame["ideal_speedup"]
        frame["top1_delta"] = frame["top1"] - base["top1"]
        frames.append(frame)
    report = pd.concat(frames, ignore_index=True)
    report["_reference_first"] = report["method"] != REFERENCE
    report = report.sort_values(
        ["resolution", "_reference_first", "method", "keep_rate"], ascending=[True, True, True, False]
    )
    return report[COLUMNS].reset_index(drop=True)


def format_markdown(report: pd.DataFrame) -> str:
    sections = []
    for resolution, group in report.groupby("resolution", sort=True):
        table = group.drop(columns="resolution").dropna(axis="columns", how="all")
        sections.append(f"## {resolution}x{resolution}\n\n{table.to_markdown(index=False, floatfmt='.3f')}\n")
    return "\n".join(sections)


def write_report(run: str | Path) -> str:
    """Write report.csv and report.md into the run folder and return the Markdown."""
    run_dir = Path(run)
    report = build_report(read_records(run_dir))
    write_csv_atomically(report, run_dir / "report.csv")
    markdown = format_markdown(report)
    (run_dir / "report.md").write_text(markdown)
    return markdown
