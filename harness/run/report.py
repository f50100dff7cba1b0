"""Tables from a run's records: per group (model, resolution, batch size, execution mode), each
configuration against that group's vanilla reference and its own floor twin."""

from __future__ import annotations

import warnings
from pathlib import Path

import pandas as pd

from harness.run.records import REFERENCE, output_path, read_records, write_csv_atomically, write_text_atomically
from methods.errors import TokenBenchError

GROUP = ["device", "model", "resolution", "batch_size_requested", "mode"]
UNTRAINED_TOP1 = "no checkpoint given: the top-1 of randomly initialised models means nothing"  # run and report
COLUMNS = [
    *GROUP,
    "method",
    "keep_rate",
    "checkpoint",
    "batch_size",
    "gmacs",
    "mac_reduction_pct",
    "img_per_s",
    "reference_img_per_s",
    "speedup",
    "ideal_speedup",
    "pct_of_ideal",
    "floor_speedup",
    "pct_of_floor",
    "top1",
    "top1_delta",
    "top5",
    "top1_real",
    "top1_real_delta",
]


def with_group_columns(records: pd.DataFrame) -> pd.DataFrame:
    """Records of runs made before batch sizes and modes were axes: one batch, the autocast precision,
    no floor twin, no ImageNet-ReaL top-1 and no checkpoint column."""
    frame = records.copy()
    if "batch_size_requested" not in frame:
        frame["batch_size_requested"] = frame["batch_size"].astype(str)
    if "mode" not in frame:
        frame["mode"] = frame["precision"] + " autocast"
    for column in ("floor_speedup", "reference_img_per_s", "top1_real", "checkpoint"):
        if column not in frame:
            frame[column] = float("nan")
    frame["batch_size_requested"] = frame["batch_size_requested"].astype(str)
    return frame


def warn_of_untrained_top1(records: pd.DataFrame) -> None:
    """Top-1 of a model without a checkpoint is that of random weights: `bench run` says so as it measures,
    and the tables and figures built from its rows say it again, where the number is read."""
    if "top1" not in records or "checkpoint" not in records:
        return
    untrained = records["top1"].notna() & records["checkpoint"].astype(object).fillna("").eq("")  # empty cells: NaN
    if untrained.all():  # as bench run words it, so that a run and its report say it once
        warnings.warn(UNTRAINED_TOP1, stacklevel=2)
    elif untrained.any():
        warnings.warn(
            f"{int(untrained.sum())} of {len(records)} rows hold the top-1 of randomly initialised models (no "
            f"checkpoint given), which means nothing",
            stacklevel=2,
        )


def build_report(records: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, with MAC reduction and top-1 change against its group's vanilla.

    `speedup` is the ratio of medians measured interleaved with vanilla in the same windows
    (`reference_img_per_s` is that vanilla's img/s), which holds on noisy machines where img/s
    across rows would not. `ideal_speedup` is the MAC ratio, what the method would gain if time
    followed MACs; `floor_speedup` is what its token counts allow when selection costs one slice.
    `pct_of_ideal` and `pct_of_floor` say how much of each the method gets.
    """
    frames = []
    for key, group in with_group_columns(records).groupby(GROUP, sort=True):
        reference = group[group["method"] == REFERENCE]
        if reference.empty:
            raise TokenBenchError(f"no vanilla row for {describe_group(key)}: the report compares against it")
        if len(reference) > 1:  # a folder from before run.json, holding runs of other data or weights
            raise TokenBenchError(
                f"{len(reference)} vanilla rows for {describe_group(key)} (runs with other data, checkpoints or "
                f"timing in one folder): report each from its own folder"
            )
        base = reference.iloc[0]
        frame = group.copy()
        frame["mac_reduction_pct"] = 100 * (1 - frame["gmacs"] / base["gmacs"])
        frame["ideal_speedup"] = base["gmacs"] / frame["gmacs"]
        frame["pct_of_ideal"] = 100 * frame["speedup"] / frame["ideal_speedup"]
        frame["pct_of_floor"] = 100 * frame["speedup"] / frame["floor_speedup"]
        frame["top1_delta"] = frame["top1"] - base["top1"]
        frame["top1_real_delta"] = frame["top1_real"] - base["top1_real"]
        frames.append(frame)
    report = pd.concat(frames, ignore_index=True)
    report["_reference_first"] = report["method"] != REFERENCE
    order = [*GROUP, "_reference_first", "method", "keep_rate"]
    report = report.sort_values(order, ascending=[True] * (len(GROUP) + 2) + [False])
    return report[COLUMNS].reset_index(drop=True)


def describe_group(key: tuple) -> str:
    device, model, resolution, batch, mode = key
    return f"{model} at {resolution}x{resolution}, batch {batch}, {mode} on {device}"


def format_markdown(report: pd.DataFrame) -> str:
    """A section per group; its title names the model, resolution, batch size and mode, and its
    vanilla row's img/s is the one its own `reference_img_per_s` repeats."""
    sections = []
    for key, group in report.groupby(GROUP, sort=False):
        table = group.drop(columns=GROUP).dropna(axis="columns", how="all")
        sections.append(f"## {describe_group(key)}\n\n{table.to_markdown(index=False, floatfmt='.3f')}\n")
    return "\n".join(sections)


def write_report(run: str | Path) -> str:
    """Write report.csv and report.md into the run folder (beside a records CSV given directly: see
    `output_path`) and return the Markdown."""
    records = read_records(run)
    warn_of_untrained_top1(records)
    report = build_report(records)
    write_csv_atomically(report, output_path(run, "report.csv"))
    markdown = format_markdown(report)
    write_text_atomically(markdown, output_path(run, "report.md"))
    return markdown
