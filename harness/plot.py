"""Trade-off figures from a run's records: one line per method across keep rates, per resolution."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from harness.records import REFERENCE, read_records  # noqa: E402

LABELS = {"img_per_s": "throughput (img/s)", "gmacs": "GMACs", "top1": "top-1 (%)", "keep_rate": "keep rate"}
# (x, y, whether larger x is better): the papers' trade-offs with accuracy, else cost against keep rate.
WITH_ACCURACY = [("img_per_s", "top1", True), ("gmacs", "top1", False)]
WITHOUT_ACCURACY = [("keep_rate", "img_per_s", None), ("keep_rate", "gmacs", None)]


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


def draw_panel(ax: plt.Axes, group: pd.DataFrame, x: str, y: str, larger_x_better: bool | None) -> None:
    reduced = group[group["method"] != REFERENCE].sort_values(["method", "keep_rate"])
    sns.lineplot(data=reduced, x=x, y=y, hue="method", marker="o", estimator=None, sort=False, ax=ax)
    reference = group[group["method"] == REFERENCE]
    ax.scatter(reference[x], reference[y], marker="*", s=180, color="black", label=REFERENCE, zorder=3)
    if larger_x_better is not None:
        front = pareto_front(group.dropna(subset=[x, y]), x, y, larger_x_better)
        ax.scatter(front[x], front[y], s=160, facecolors="none", edgecolors="crimson", label="Pareto front", zorder=4)
    ax.set_xlabel(LABELS[x])
    ax.set_ylabel(LABELS[y])
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)


def trade_off_figure(group: pd.DataFrame) -> Figure:
    """The figure for one resolution's rows."""
    panels = WITH_ACCURACY if group["top1"].notna().any() else WITHOUT_ACCURACY
    sns.set_theme(style="whitegrid")
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5))
    for ax, (x, y, larger_x_better) in zip(axes, panels):
        draw_panel(ax, group, x, y, larger_x_better)
    first = group.iloc[0]
    figure.suptitle(f"{first['model']} at {first['resolution']}px, {first['device']} {first['precision']}")
    figure.tight_layout()
    return figure


def plot_run(run: str | Path) -> list[Path]:
    """Write tradeoff_<resolution>.png and .svg into the run folder; returns the paths."""
    run_dir = Path(run)
    records = read_records(run_dir)
    written = []
    for resolution, group in records.groupby("resolution", sort=True):
        figure = trade_off_figure(group)
        for suffix in ("png", "svg"):
            path = run_dir / f"tradeoff_{resolution}.{suffix}"
            figure.savefig(path, dpi=120)
            written.append(path)
        plt.close(figure)
    return written
