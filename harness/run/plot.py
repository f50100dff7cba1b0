"""Figures from a run's records, per model, resolution and execution mode: the trade-off at each batch
size (one line per method across keep rates), and, with several batch sizes, speedup against batch
size, where the crossover at which reduction starts to pay shows."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness.run.records import REFERENCE, output_path, read_records, write_text_atomically  # noqa: E402
from harness.run.report import warn_of_untrained_top1, with_group_columns  # noqa: E402

THROUGHPUT = "vanilla_img_per_s_x_speedup"  # the throughput plotted (`with_comparable_throughput`)
LABELS = {THROUGHPUT: "throughput (img/s): vanilla's x speedup", "gmacs": "GMACs", "top1": "top-1 (%)"}
LABELS["keep_rate"] = "keep rate"
# (x, y, whether larger x is better): the papers' trade-offs with accuracy, else cost against keep rate
# and throughput against GMACs beside the ideal (time following MACs).
WITH_ACCURACY = [(THROUGHPUT, "top1", True), ("gmacs", "top1", False)]
WITHOUT_ACCURACY = [("keep_rate", THROUGHPUT, None), ("keep_rate", "gmacs", None), ("gmacs", THROUGHPUT, None)]
IDEAL_LABEL = "ideal: vanilla img/s x MAC ratio"
FIGURE_AXES = ["device", "model", "resolution", "mode"]
FIGURES_MANIFEST = ".figures.json"  # the figures the last plot of a run wrote (`remove_superseded_figures`)


def pareto_front(points: pd.DataFrame, x: str, y: str, larger_x_better: bool) -> pd.DataFrame:
    """The points no other point beats on both axes (higher y, and better x)."""
    ordered = points.sort_values([x, y], ascending=[not larger_x_better, False])
    best_y = float("-inf")
    keep = []
    for index, row in ordered.iterrows():
        if row[y] > best_y:
            keep.append(index)
            best_y = row[y]
    return points.loc[keep]


def with_comparable_throughput(group: pd.DataFrame) -> pd.DataFrame:
    """Each row's throughput as one vanilla img/s x the row's speedup. A row's own img/s is timed in its own
    windows, and on a loaded machine the rows' absolute figures drift apart by more than the methods differ
    (results/README.md); its speedup, timed interleaved with vanilla, does not. The vanilla img/s: the median
    of the group's vanilla runs, each timed beside a row (older records: img/s over speedup)."""
    frame = group.copy()
    reference = frame["reference_img_per_s"].fillna(frame["img_per_s"] / frame["speedup"])
    frame[THROUGHPUT] = reference.median() * frame["speedup"]
    return frame


def draw_ideal(ax: plt.Axes, group: pd.DataFrame) -> None:
    """Throughput if time followed MACs: vanilla's x (vanilla's GMACs / GMACs), a hyperbola."""
    reference = group[group["method"] == REFERENCE].iloc[0]
    gmacs = np.linspace(group["gmacs"].min(), group["gmacs"].max(), 50)
    ax.plot(gmacs, reference[THROUGHPUT] * reference["gmacs"] / gmacs, ls=":", color="grey", label=IDEAL_LABEL)


def draw_panel(ax: plt.Axes, group: pd.DataFrame, x: str, y: str, larger_x_better: bool | None) -> None:
    reduced = group[group["method"] != REFERENCE].sort_values(["method", "keep_rate"])
    sns.lineplot(data=reduced, x=x, y=y, hue="method", marker="o", estimator=None, sort=False, ax=ax)
    reference = group[group["method"] == REFERENCE]
    ax.scatter(reference[x], reference[y], marker="*", s=180, color="black", label=REFERENCE, zorder=3)
    if larger_x_better is not None:
        front = pareto_front(group.dropna(subset=[x, y]), x, y, larger_x_better)
        ax.scatter(front[x], front[y], s=160, facecolors="none", edgecolors="crimson", label="Pareto front", zorder=4)
    if (x, y) == ("gmacs", THROUGHPUT) and not reference.empty:
        draw_ideal(ax, group)
    ax.set_xlabel(LABELS[x])
    ax.set_ylabel(LABELS[y])
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def title(group: pd.DataFrame, batch: bool = True) -> str:
    first = group.iloc[0]
    batch_text = f", batch {first['batch_size_requested']}" if batch else ""
    return f"{first['model']} at {first['resolution']}px{batch_text}, {first['device']} {first['mode']}"


def trade_off_figure(group: pd.DataFrame) -> Figure:
    """The figure for one group's rows (one model, resolution, batch size and mode)."""
    group = with_comparable_throughput(with_group_columns(group))
    panels = WITH_ACCURACY if group["top1"].notna().any() else WITHOUT_ACCURACY
    sns.set_theme(style="whitegrid")
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (x, y, larger_x_better) in zip(axes, panels):
        draw_panel(ax, group, x, y, larger_x_better)
    figure.suptitle(title(group))
    figure.tight_layout()
    return figure


def speedup_vs_batch_figure(rows: pd.DataFrame) -> Figure:
    """Speedup over vanilla against batch size (log2) for one model, resolution and mode: a solid line
    per method and keep rate, its floor twin dashed in the same colour, and y = 1 (no gain) marked."""
    reduced = with_group_columns(rows)
    reduced = reduced[reduced["method"] != REFERENCE].sort_values("batch_size")
    sns.set_theme(style="whitegrid")
    figure, ax = plt.subplots(figsize=(7, 4.5))
    configurations = list(reduced.groupby(["method", "keep_rate"], sort=True))
    colours = sns.color_palette(n_colors=max(len(configurations), 1))
    for colour, ((method, keep_rate), line) in zip(colours, configurations):
        label = f"{method} {keep_rate:g}"
        ax.plot(line["batch_size"], line["speedup"], marker="o", color=colour, label=label)
        ax.plot(line["batch_size"], line["floor_speedup"], ls="--", color=colour, label=f"{label} floor")
    ax.axhline(1.0, color="black", lw=1, label="vanilla (no gain)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("speedup over vanilla")
    ax.legend(fontsize="x-small", ncol=2)
    figure.suptitle(title(reduced, batch=False))
    figure.tight_layout()
    return figure


def slug(values: list[object]) -> str:
    return "_".join(re.sub(r"[^A-Za-z0-9._]+", "-", str(value)).strip("-") for value in values)


def plot_run(run: str | Path) -> list[Path]:
    """Write the figures (PNG and SVG) into the run folder (beside a records CSV given directly: see
    `records.output_path`) and return their paths: tradeoff_<...>.png per group and, with several batch
    sizes, speedup_vs_batch_<...>.png. The names carry the resolution and whichever of model, batch size
    and mode vary within the run."""
    records = with_group_columns(read_records(run))
    warn_of_untrained_top1(records)
    varying = [column for column in ("device", "model", "mode") if records[column].nunique() > 1]
    several_batches = records["batch_size_requested"].nunique() > 1
    figures: list[tuple[str, Figure]] = []
    for key, rows in records.groupby([*FIGURE_AXES], sort=True):
        named = dict(zip(FIGURE_AXES, key))
        parts = [named[column] for column in varying] + [named["resolution"]]
        for batch, group in rows.groupby("batch_size_requested", sort=True):
            figures.append(
                (f"tradeoff_{slug(parts + ([f'b{batch}'] if several_batches else []))}", trade_off_figure(group))
            )
        if several_batches:
            figures.append((f"speedup_vs_batch_{slug(parts)}", speedup_vs_batch_figure(rows)))
    written = []
    for stem, figure in figures:
        for suffix in ("png", "svg"):
            path = output_path(run, f"{stem}.{suffix}")
            figure.savefig(path, dpi=120)
            written.append(path)
        plt.close(figure)
    remove_superseded_figures(output_path(run, FIGURES_MANIFEST), written)
    return written


def remove_superseded_figures(manifest: Path, written: list[Path]) -> None:
    """Remove the figures an earlier plot of these records wrote and this one did not (their names change
    once a run gains an axis: tradeoff_224.png beside tradeoff_bf16-autocast-eager_224.png would show stale
    rows), and list the ones written in `manifest` for the next plot. Only files named in that list, in
    the manifest's folder, are ever removed."""
    run_dir = manifest.parent
    names = {path.name for path in written}
    try:
        earlier = json.loads(manifest.read_text())
    except (OSError, ValueError):
        earlier = []
    for name in earlier if isinstance(earlier, list) else []:
        if isinstance(name, str) and name not in names and Path(name).name == name:
            (run_dir / name).unlink(missing_ok=True)
    write_text_atomically(json.dumps(sorted(names), indent=1), manifest)
