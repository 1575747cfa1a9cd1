"""PNG figures of the results: few-shot curves, base-to-novel bars, cross-dataset heatmaps (matplotlib, Agg).

Methods and datasets appear under their display names (``display_name``). ``n/a`` marks numbers a method cannot
produce: the linear probe is class-specific, so it has no novel-class accuracy and no cross-dataset transfer.
Figures made from synthetic twins carry a "SYNTHETIC DATA" watermark and a footnote saying so.

Each ``*_figures`` function returns ``{file name: matplotlib Figure}`` (what the tests inspect); the ``plot_*``
functions save those as PNG files and return their paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from biovlm.data import display_name as dataset_display_name
from biovlm.evaluate import harmonic_mean, ordered
from biovlm.methods import METHOD_NAMES
from biovlm.methods import display_name as method_display_name

NA = "n/a"
SYNTHETIC_MARK = "SYNTHETIC DATA"
SYNTHETIC_NOTE = ("Synthetic data: made from synthetic twins of the MedMNIST+ datasets (the offline demo), "
                  "not benchmark results.")
DIAGONAL_NOTE = "Outlined cells: in-domain (tested on the dataset it was trained on)."
DPI = 150


def display_name(name: str) -> str:
    """How tables and figures print a method or dataset id (``coop`` -> CoOp, ``pathmnist`` -> PathMNIST)."""
    return method_display_name(name) if name in METHOD_NAMES else dataset_display_name(name)


def not_applicable_note(absent: Sequence[str], what: str) -> str:
    """The footnote for methods without numbers in a setting, e.g. "n/a: Linear probe cannot classify ..."."""
    return f"{NA}: {', '.join(display_name(m) for m in absent)} cannot classify {what}."


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _footer(fig, notes: Sequence[str], synthetic: bool) -> None:
    """Notes under the figure; for synthetic data also a watermark across it (both are fig.texts)."""
    lines = list(notes) + ([SYNTHETIC_NOTE] if synthetic else [])
    if lines:
        fig.text(0.01, 0, "\n".join(lines), ha="left", va="top", fontsize=8)
    if synthetic:  # faint enough to read the data through, left out of the layout (it would widen the margins)
        width = fig.get_size_inches()[0]
        mark = fig.text(0.5, 0.5, SYNTHETIC_MARK, ha="center", va="center", rotation=25, fontsize=6 * width,
                        color="tab:red", alpha=0.13, fontweight="bold", zorder=10)
        mark.set_in_layout(False)


def _save(figures: dict, out: Path) -> list[Path]:
    plt = _pyplot()
    paths = []
    for name, fig in figures.items():
        paths.append(out / name)
        fig.savefig(paths[-1], dpi=DPI, bbox_inches="tight")
        plt.close(fig)
    return paths


# ---------------------------------------------------------------------------------------------- few-shot
def fewshot_figures(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str],
                    synthetic: bool = False) -> dict:
    """Average accuracy vs K (error bars: std over seeds), and one panel per dataset (mean over seeds)."""
    plt = _pyplot()
    rows = df[(df.setting == "fewshot") & (df.part == "all")]
    if rows.empty:
        return {}
    methods = ordered(rows.method, methods)
    datasets = ordered(rows.target, datasets)
    ks = sorted(int(k) for k in rows.shots.unique())
    per_seed = rows.groupby(["method", "shots", "seed"])["accuracy"].mean()
    fig, ax = plt.subplots(figsize=(6.5, 4), layout="constrained")
    for i, method in enumerate(methods):
        stats = per_seed.loc[method].groupby("shots").agg(["mean", lambda s: s.std(ddof=0)])
        dodge = 2 ** (0.04 * (i - (len(methods) - 1) / 2))  # side by side at each K, so error bars do not overlap
        ax.errorbar(stats.index * dodge, stats.iloc[:, 0], yerr=stats.iloc[:, 1], marker="o", capsize=3,
                    label=display_name(method))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set(xlabel="shots per class (K)", ylabel="accuracy (%)", title="Few-shot accuracy, average over datasets")
    ax.grid(alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    _footer(fig, ["Error bars: std over seeds."], synthetic)
    figures = {"fewshot_average.png": fig}

    cols = min(4, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3 * cols, 2.4 * nrows + 0.6), squeeze=False, layout="constrained")
    means = rows.groupby(["target", "method", "shots"])["accuracy"].mean()
    for ax, ds in zip(axes.flat, datasets, strict=False):
        for method in methods:
            if (ds, method) in means.index.droplevel("shots"):
                series = means.loc[(ds, method)]
                ax.plot(series.index, series.values, marker=".", label=display_name(method))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(display_name(ds), fontsize=10)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.supxlabel("shots per class (K)", fontsize=10)
    fig.supylabel("accuracy (%)", fontsize=10)
    _footer(fig, ["Mean over seeds."], synthetic)
    figures["fewshot_per_dataset.png"] = fig
    return figures


def plot_fewshot(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str], out: Path,
                 synthetic: bool = False) -> list[Path]:
    return _save(fewshot_figures(df, methods, datasets, synthetic), out)


# ---------------------------------------------------------------------------------------------- cross-dataset
def crossdata_matrices(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str]) -> dict[str, pd.DataFrame]:
    """{method: source x target mean accuracy over seeds}, with only the sources and targets that ran."""
    rows = df[(df.setting == "crossdata") & (df.part == "all")]
    out = {}
    for method in ordered(rows.method, methods):
        mine = rows[rows.method == method]
        out[method] = (mine.groupby(["source", "target"])["accuracy"].mean().unstack("target")
                       .reindex(index=ordered(mine.source, datasets), columns=ordered(mine.target, datasets)))
    return out


def crossdata_figures(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str],
                      synthetic: bool = False) -> dict:
    """One heatmap per method (rows: sources trained on, columns: targets tested on), mean accuracy in each cell,
    the in-domain cells (source = target) outlined; methods without cross-dataset numbers are named as n/a."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    matrices = crossdata_matrices(df, methods, datasets)
    if not matrices:
        return {}
    n_src = max(len(m.index) for m in matrices.values())
    n_tgt = max(len(m.columns) for m in matrices.values())
    cols = min(2, len(matrices))
    nrows = math.ceil(len(matrices) / cols)
    cell = 0.42  # inches: room for a two-digit value at 7 pt
    fig, axes = plt.subplots(nrows, cols, squeeze=False, layout="constrained",
                             figsize=(cols * (cell * n_tgt + 1.6) + 0.8, nrows * (cell * n_src + 1.5)))
    image = None
    for ax, (method, matrix) in zip(axes.flat, matrices.items(), strict=False):
        values = matrix.to_numpy(dtype=float)
        image = ax.imshow(values, vmin=0, vmax=100, cmap="viridis")
        for (i, j), value in np.ndenumerate(values):
            text = NA if np.isnan(value) else f"{value:.0f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if value >= 60 else "white")
        for i, source in enumerate(matrix.index):
            if source in matrix.columns:
                j = list(matrix.columns).index(source)
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2,
                                       clip_on=False))
        ax.set_title(display_name(method), fontsize=10)
        ax.set_xticks(range(len(matrix.columns)), [display_name(t) for t in matrix.columns], rotation=45,
                      ha="right", rotation_mode="anchor", fontsize=7)
        ax.set_yticks(range(len(matrix.index)), [display_name(s) for s in matrix.index], fontsize=7)
        ax.set_xlabel("tested on", fontsize=8)
        ax.set_ylabel("trained on", fontsize=8)
    for ax in list(axes.flat)[len(matrices):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, shrink=min(1.0, 3 / nrows), label="accuracy (%)")
    notes = ["Cells: accuracy (%), mean over seeds. " + DIAGONAL_NOTE]
    absent = [m for m in methods if m not in matrices]
    if absent:
        notes.append(not_applicable_note(absent, "another dataset's classes"))
    _footer(fig, notes, synthetic)
    return {"crossdata_heatmap.png": fig}


def plot_crossdata(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str], out: Path,
                   synthetic: bool = False) -> list[Path]:
    return _save(crossdata_figures(df, methods, datasets, synthetic), out)


# ---------------------------------------------------------------------------------------------- base-to-novel
def base2new_averages(df: pd.DataFrame, methods: Sequence[str]) -> pd.DataFrame:
    """Per method: dataset-average base and novel accuracy (mean and std over seeds) and the HM of the means;
    NaN where the method has no such runs (the linear probe's novel classes)."""
    rows = df[df.setting == "base2new"]
    pivot = rows.pivot_table(index=["method", "target", "seed"], columns="part", values="accuracy")
    per_seed = pivot.reindex(columns=["base", "novel"]).groupby(level=["method", "seed"]).mean()
    grouped = per_seed.groupby(level="method")
    avg = grouped.mean().join(grouped.std(ddof=0).add_suffix("_std")).reindex(ordered(rows.method, methods))
    avg["hm"] = harmonic_mean(avg["base"].to_numpy(float), avg["novel"].to_numpy(float))  # the published HM
    return avg


def base2new_figures(df: pd.DataFrame, methods: Sequence[str], synthetic: bool = False) -> dict:
    """Average base, novel and harmonic-mean accuracy per method (grouped bars, error bars: std over seeds);
    "n/a" stands where a method has no number."""
    plt = _pyplot()
    if (df.setting == "base2new").sum() == 0:
        return {}
    avg = base2new_averages(df, methods)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(avg) + 1.5), 4), layout="constrained")
    x = np.arange(len(avg))
    width = 0.27
    for i, (part, label) in enumerate((("base", "base"), ("novel", "novel"), ("hm", "harmonic mean"))):
        pos = x + (i - 1) * width
        err = avg.get(f"{part}_std")
        ax.bar(pos, avg[part].fillna(0).to_numpy(float), width=width, label=label,
               yerr=None if err is None else err.fillna(0).to_numpy(float), capsize=2)
        for p, value in zip(pos, avg[part], strict=True):
            if np.isnan(value):
                ax.text(p, 2, NA, ha="center", va="bottom", rotation=90, fontsize=8, color="dimgray")
    ax.set_xticks(x, [display_name(m) for m in avg.index], rotation=30, ha="right", rotation_mode="anchor",
                  fontsize=8)
    ax.set(ylabel="accuracy (%)", title="Base-to-novel accuracy, average over datasets", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside right upper", fontsize=8)
    notes = ["Error bars: std over seeds (none for the harmonic mean, which is of the mean base and novel)."]
    absent = list(avg.index[avg["novel"].isna()])
    if absent:
        notes.append(not_applicable_note(absent, "classes it was not trained on"))
    _footer(fig, notes, synthetic)
    return {"base2new.png": fig}


def plot_base2new(df: pd.DataFrame, methods: Sequence[str], out: Path, synthetic: bool = False) -> list[Path]:
    return _save(base2new_figures(df, methods, synthetic), out)
