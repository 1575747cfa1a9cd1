"""Metrics of one prediction, and the aggregation of every run's results into the three settings' summaries.

Per run and evaluated part (``biovlm.runs`` writes one row each, see ``RESULT_COLUMNS``):

- ``accuracy``: top-1 accuracy.
- ``macro_f1``: F1 averaged over the classes present in the labels or the predictions (equal to sklearn's macro
  F1 with ``zero_division=0``).
- ``auc``: one-vs-rest ROC AUC, averaged over the classes that occur in the labels (a class absent from the test
  labels has no AUC and is skipped; sklearn's own ``multi_class="ovr"`` refuses such label sets). With two classes
  it is the AUC of the positive class (label 1). Undefined (NaN) with fewer than two classes present. Computed as
  the Mann-Whitney U statistic, equal to ``sklearn.metrics.roc_auc_score`` (tests check both against sklearn)
  at about a tenth of its cost: the train stages score a few hundred predictions each.
- ``ece``: expected calibration error with 15 equal-width confidence bins: sum over bins of
  (bin size / N) * |accuracy in bin - mean confidence in bin|, confidence = the top softmax probability.

All four are reported in percent (0-100). Aggregates are the mean and the standard deviation over seeds
(population std, ``ddof=0``, as CoOp's result parser computes it). A dataset-average row averages over datasets
within each seed first, then takes mean and std over the seeds. The module imports no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

METRICS = ("accuracy", "macro_f1", "auc", "ece")
RESULT_COLUMNS = ("method", "setting", "source", "target", "shots", "seed", "part", "n_classes", "n",
                  *METRICS)
PARTS = ("all", "base", "novel")
ECE_BINS = 15
AVERAGE = "average"


# ---------------------------------------------------------------------------------------------- one prediction
def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = ECE_BINS) -> float:
    """ECE (fraction, 0-1) with ``n_bins`` equal-width bins over the top-class confidence in [0, 1]."""
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    # bin i holds confidences in (i/n, (i+1)/n]; a confidence of exactly 0 goes to the first bin
    bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        mask = bins == b
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def binary_auc(positive: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for the boolean ``positive`` (Mann-Whitney U with average ranks for ties: the same
    number as ``sklearn.metrics.roc_auc_score``, at a fraction of its per-call cost)."""
    from scipy.stats import rankdata

    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def one_vs_rest_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Macro one-vs-rest ROC AUC over the classes present in ``labels`` (binary: AUC of class 1); NaN if
    fewer than two classes are present."""
    probs, labels = np.asarray(probs), np.asarray(labels)
    present = np.unique(labels)
    if len(present) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return binary_auc(labels == 1, probs[:, 1])
    return float(np.mean([binary_auc(labels == c, probs[:, c]) for c in present]))


def macro_f1(labels: np.ndarray, pred: np.ndarray) -> float:
    """F1 averaged over the classes present in the labels or the predictions, 0 for a class never predicted
    correctly (``sklearn.metrics.f1_score(average="macro", zero_division=0)``)."""
    classes = np.union1d(labels, pred)
    tp = np.array([np.sum((pred == c) & (labels == c)) for c in classes])
    predicted = np.array([np.sum(pred == c) for c in classes])
    actual = np.array([np.sum(labels == c) for c in classes])
    # every class occurs in the labels or the predictions: predicted + actual > 0
    return float((2 * tp / (predicted + actual)).mean())


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """accuracy, macro_f1, auc, ece (percent) and n for class probabilities ``[N, C]`` and labels ``[N]``."""
    probs, labels = np.asarray(probs), np.asarray(labels).ravel()  # the metrics below compute in float64
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be [N, C] with one row per label; got {probs.shape} for {labels.shape} labels")
    if len(labels) == 0:
        raise ValueError("cannot score an empty test set")
    if labels.min() < 0 or labels.max() >= probs.shape[1]:
        raise ValueError(f"labels must lie in 0..{probs.shape[1] - 1} (one column per class), got "
                         f"{labels.min()}..{labels.max()}")
    pred = probs.argmax(axis=1)
    return {
        "accuracy": 100.0 * float((pred == labels).mean()),
        "macro_f1": 100.0 * macro_f1(labels, pred),
        "auc": 100.0 * one_vs_rest_auc(probs, labels),
        "ece": 100.0 * expected_calibration_error(probs, labels),
        "n": len(labels),
    }


def harmonic_mean(a: float | np.ndarray, b: float | np.ndarray) -> float | np.ndarray:
    """2ab / (a + b), 0 where both are 0, NaN where either is NaN."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(invalid="ignore"):  # 0/0 where both are 0 (accuracies are >= 0: no x/0 with x != 0)
        hm = np.where(a + b > 0, 2 * a * b / (a + b), 0.0)
    hm = np.where(np.isnan(a) | np.isnan(b), np.nan, hm)
    return float(hm) if hm.ndim == 0 else hm


# ---------------------------------------------------------------------------------------------- results tables
def load_results(paths: Iterable[str | Path]) -> pd.DataFrame:
    """Concatenate results CSVs (one per method), checking their columns."""
    frames = []
    for path in paths:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"results file {path} not found; run its train stage (dvc repro)")
        frame = pd.read_csv(path)
        missing = [c for c in RESULT_COLUMNS if c not in frame.columns]
        if missing:
            raise ValueError(f"{path} lacks the columns {missing}; rerun its train stage")
        frames.append(frame)
    if not frames:
        raise ValueError("no results files given")
    return pd.concat(frames, ignore_index=True)


def _mean_std(values: pd.Series) -> dict[str, float]:
    values = values.dropna()
    if values.empty:
        return {}
    return {"mean": round(float(values.mean()), 4), "std": round(float(values.std(ddof=0)), 4)}


def _seed_stats(frame: pd.DataFrame, metrics: Sequence[str] = METRICS) -> dict:
    """{metric: {mean, std}} over the rows of ``frame`` (one per seed); metrics without a value are left out."""
    return {m: s for m in metrics if (s := _mean_std(frame[m]))}


def _average_over(frame: pd.DataFrame, metrics: Sequence[str] = METRICS) -> dict:
    """Average the rows of each seed (one per dataset, or per dataset pair), then mean and std over seeds."""
    per_seed = frame.groupby("seed")[list(metrics)].mean()
    return {m: s for m in metrics if (s := _mean_std(per_seed[m]))}


def ordered(values: Iterable, preferred: Sequence | None) -> list:
    """The distinct ``values``: those in ``preferred`` in its order, then the others as they first appear."""
    values = list(dict.fromkeys(values))
    if preferred is None:
        return values
    return [v for v in preferred if v in values] + [v for v in values if v not in preferred]


def fewshot_metrics(df: pd.DataFrame, methods: Sequence[str] | None = None,
                    datasets: Sequence[str] | None = None) -> dict:
    """``{method: {"k<K>": {dataset | "average": {metric: {mean, std}}}}}``."""
    df = df[(df.setting == "fewshot") & (df.part == "all")]
    out: dict = {}
    for method in ordered(df.method, methods):
        rows = df[df.method == method]
        out[method] = {}
        for k in sorted(rows.shots.unique()):
            at_k = rows[rows.shots == k]
            entry = {ds: _seed_stats(at_k[at_k.target == ds]) for ds in ordered(at_k.target, datasets)}
            entry[AVERAGE] = _average_over(at_k)
            out[method][f"k{int(k)}"] = entry
    return out


def _base2new_per_seed(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per (target, seed): base and novel accuracy and their harmonic mean (NaN where novel is n/a)."""
    pivot = rows.pivot_table(index=["target", "seed"], columns="part", values="accuracy")  # aggfunc: mean
    pivot = pivot.reindex(columns=["base", "novel"])
    pivot["hm"] = harmonic_mean(pivot["base"].to_numpy(), pivot["novel"].to_numpy())
    return pivot.reset_index()


def base2new_metrics(df: pd.DataFrame, methods: Sequence[str] | None = None,
                     datasets: Sequence[str] | None = None) -> dict:
    """{method: {dataset | "average": {"base": {metric: ...}, "novel": {...}, "hm": {"mean"},
    "hm_per_seed": {mean, std}}}}.

    ``hm`` is the published harmonic mean (CoCoOp's and BiomedCoOp's tables): per dataset, HM of the seed-mean base
    and seed-mean novel accuracies; in the average row, HM of the average base and average novel accuracies, so the
    HM column always equals 2ab/(a+b) of the base and novel columns. ``hm_per_seed`` is the mean and std over seeds
    of per-seed HMs (in the average row: of the per-seed means over datasets), lower than ``hm`` since HM is
    concave. A method that cannot classify unseen classes (linear probe) has no novel rows, so no novel and no HM."""
    df = df[df.setting == "base2new"]
    out: dict = {}
    for method in ordered(df.method, methods):
        rows = df[df.method == method]
        per_seed = _base2new_per_seed(rows)
        out[method] = {}
        for ds in ordered(rows.target, datasets):
            entry = {part: stats for part in ("base", "novel")
                     if (stats := _seed_stats(rows[(rows.target == ds) & (rows.part == part)]))}
            out[method][ds] = {**entry, **_hm_entries(entry, per_seed.loc[per_seed.target == ds, "hm"])}
        average = {part: stats for part in ("base", "novel")
                   if (stats := _average_over(rows[rows.part == part]))}
        out[method][AVERAGE] = {**average, **_hm_entries(average, per_seed.groupby("seed")["hm"].mean())}
    return out


def _hm_entries(parts: dict, per_seed_hm: pd.Series) -> dict:
    """``hm`` (HM of the reported base and novel mean accuracies) and ``hm_per_seed``, where novel exists."""
    if "novel" not in parts or "base" not in parts:
        return {}
    hm = harmonic_mean(parts["base"]["accuracy"]["mean"], parts["novel"]["accuracy"]["mean"])
    return {"hm": {"mean": round(float(hm), 4)}, "hm_per_seed": _mean_std(per_seed_hm)}


def crossdata_metrics(df: pd.DataFrame, methods: Sequence[str] | None = None,
                      datasets: Sequence[str] | None = None) -> dict:
    """{method: {source: {target: {accuracy: {mean, std}}, "off_diagonal": {...}}, "average": {...}}}.

    The diagonal (source == target) is the in-domain few-shot result; ``off_diagonal`` averages the transfers
    from one source within each seed; the method's ``average`` averages every off-diagonal pair."""
    df = df[(df.setting == "crossdata") & (df.part == "all")]
    out: dict = {}
    for method in ordered(df.method, methods):
        rows = df[df.method == method]
        out[method] = {}
        for source in ordered(rows.source, datasets):
            from_source = rows[rows.source == source]
            entry = {t: _seed_stats(from_source[from_source.target == t], ["accuracy"])
                     for t in ordered(from_source.target, datasets)}
            off = from_source[from_source.target != source]
            if not off.empty:
                entry["off_diagonal"] = _average_over(off, ["accuracy"])
            out[method][source] = entry
        off = rows[rows.source != rows.target]
        if not off.empty:
            out[method][AVERAGE] = {"off_diagonal": _average_over(off, ["accuracy"]),
                                    "in_domain": _average_over(rows[rows.source == rows.target], ["accuracy"])}
    return out


def summary_metrics(fewshot: dict, base2new: dict, crossdata: dict) -> dict:
    """The headline numbers: few-shot accuracy at the largest K, mean base-to-novel HM, mean off-diagonal
    cross-dataset accuracy, each averaged over datasets and seeds. Methods without a number are left out."""
    out: dict = {"fewshot": {}, "base2new": {}, "crossdata": {}}
    for method, per_k in fewshot.items():
        if per_k:
            top = max(per_k, key=lambda k: int(k[1:]))
            if "accuracy" in per_k[top][AVERAGE]:
                out["fewshot"][method] = per_k[top][AVERAGE]["accuracy"]["mean"]
    for method, entry in base2new.items():
        if "hm" in entry[AVERAGE]:  # base2new_metrics writes an average entry for every method
            out["base2new"][method] = entry[AVERAGE]["hm"]["mean"]
    for method, entry in crossdata.items():
        if AVERAGE in entry:
            out["crossdata"][method] = entry[AVERAGE]["off_diagonal"]["accuracy"]["mean"]
    return out


# ---------------------------------------------------------------------------------------------- plot data
def fewshot_curve(df: pd.DataFrame, methods: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table (method, shots, accuracy, std): dataset-average accuracy per K, mean and std over seeds."""
    df = df[(df.setting == "fewshot") & (df.part == "all")]
    per_seed = df.groupby(["method", "shots", "seed"])["accuracy"].mean().reset_index()
    curve = per_seed.groupby(["method", "shots"])["accuracy"].agg(["mean", lambda s: s.std(ddof=0)])
    curve.columns = ["accuracy", "std"]
    curve = curve.reset_index()
    order = {m: i for i, m in enumerate(ordered(curve.method, methods))}
    curve = curve.assign(rank=curve.method.map(order)).sort_values(["rank", "shots"]).drop(columns="rank")
    return curve.round(4).reset_index(drop=True)


def crossdata_matrix(df: pd.DataFrame, methods: Sequence[str] | None = None,
                     datasets: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table (method, source, target, accuracy): mean accuracy over seeds for every pair."""
    df = df[(df.setting == "crossdata") & (df.part == "all")]
    table = df.groupby(["method", "source", "target"])["accuracy"].mean().round(4).reset_index()
    m_order = {m: i for i, m in enumerate(ordered(table.method, methods))}
    d_order = {d: i for i, d in enumerate(ordered(list(table.source) + list(table.target), datasets))}
    keys = {"method": m_order, "source": d_order, "target": d_order}
    return table.sort_values(["method", "source", "target"],
                             key=lambda s: s.map(keys[s.name])).reset_index(drop=True)


def check_finite(obj, where: str = "") -> None:
    """Raise if any number in a nested metrics dict is NaN or infinite (the JSON must hold finite numbers)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            check_finite(v, f"{where}.{k}" if where else str(k))
    elif isinstance(obj, (int, float)) and not math.isfinite(obj):
        raise ValueError(f"metric {where} is {obj}")
