"""PNG figures of the results: few-shot curves, base-to-novel bars, cross-dataset heatmaps (matplotlib, Agg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from biovlm.evaluate import harmonic_mean, ordered


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_fewshot(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str], out: Path) -> list[Path]:
    """Average accuracy vs K (with std over seeds), and one panel per dataset."""
    plt = _pyplot()
    rows = df[(df.setting == "fewshot") & (df.part == "all")]
    if rows.empty:
        return []
    methods = ordered(rows.method, methods)
    datasets = ordered(rows.target, datasets)
    per_seed = rows.groupby(["method", "shots", "seed"])["accuracy"].mean()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in methods:
        stats = per_seed.loc[method].groupby("shots").agg(["mean", lambda s: s.std(ddof=0)])
        ax.errorbar(stats.index, stats.iloc[:, 0], yerr=stats.iloc[:, 1], marker="o", capsize=3, label=method)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(rows.shots.unique()), [str(k) for k in sorted(rows.shots.unique())])
    ax.set(xlabel="shots per class (K)", ylabel="accuracy (%)", title="Few-shot accuracy, average over datasets")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    paths = [out / "fewshot_average.png"]
    fig.tight_layout()
    fig.savefig(paths[0], dpi=120)
    plt.close(fig)

    cols = 4
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.2 * cols, 2.6 * nrows), squeeze=False)
    means = rows.groupby(["target", "method", "shots"])["accuracy"].mean()
    ks = sorted(int(k) for k in rows.shots.unique())
    for ax, ds in zip(axes.flat, datasets, strict=False):
        for method in methods:
            if (ds, method) in means.index.droplevel("shots"):
                series = means.loc[(ds, method)]
                ax.plot(series.index, series.values, marker=".", label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_title(ds, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(datasets):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower right", fontsize=7, ncol=2)
    fig.supxlabel("shots per class (K)")
    fig.supylabel("accuracy (%)")
    fig.tight_layout()
    paths.append(out / "fewshot_per_dataset.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def plot_crossdata(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str], out: Path) -> list[Path]:
    """One source x target accuracy heatmap per method."""
    plt = _pyplot()
    rows = df[(df.setting == "crossdata") & (df.part == "all")]
    if rows.empty:
        return []
    methods = ordered(rows.method, methods)
    names = ordered(list(rows.source) + list(rows.target), datasets)
    cols = min(3, len(methods))
    nrows = math.ceil(len(methods) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 4.2 * nrows), squeeze=False)
    image = None
    for ax, method in zip(axes.flat, methods, strict=False):
        matrix = (rows[rows.method == method].groupby(["source", "target"])["accuracy"].mean()
                  .unstack("target").reindex(index=names, columns=names))
        image = ax.imshow(matrix.to_numpy(dtype=float), vmin=0, vmax=100, cmap="viridis")
        ax.set_title(method, fontsize=10)
        ticks = np.arange(len(names))
        short = [n.removesuffix("mnist") for n in names]
        ax.set_xticks(ticks, short, rotation=90, fontsize=7)
        ax.set_yticks(ticks, short, fontsize=7)
        ax.set_xlabel("target", fontsize=8)
        ax.set_ylabel("source", fontsize=8)
    for ax in list(axes.flat)[len(methods):]:
        ax.axis("off")
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="accuracy (%)")
    path = out / "crossdata_heatmap.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return [path]


def plot_base2new(df: pd.DataFrame, methods: Sequence[str], out: Path) -> list[Path]:
    """Average base, novel and harmonic-mean accuracy per method (grouped bars)."""
    plt = _pyplot()
    rows = df[df.setting == "base2new"]
    if rows.empty:
        return []
    methods = ordered(rows.method, methods)
    pivot = rows.pivot_table(index=["method", "target", "seed"], columns="part", values="accuracy")
    pivot = pivot.reindex(columns=["base", "novel"])
    avg = pivot.groupby(level=["method", "seed"]).mean().groupby(level="method").mean().reindex(methods)
    avg["hm"] = harmonic_mean(avg["base"].to_numpy(float), avg["novel"].to_numpy(float))  # the published HM
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(methods)), 4))
    x = np.arange(len(methods))
    for i, part in enumerate(("base", "novel", "hm")):
        ax.bar(x + (i - 1) * 0.27, avg[part].to_numpy(dtype=float), width=0.27, label=part)
    ax.set_xticks(x, methods, rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (%)", title="Base-to-novel, average over datasets")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = out / "base2new.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]
