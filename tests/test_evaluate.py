"""Metrics on hand-checked predictions, and their aggregation into the settings' metrics and the summary."""

from __future__ import annotations

import math
import re
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from biovlm.evaluate import (
    RESULT_COLUMNS,
    base2new_metrics,
    binary_auc,
    check_finite,
    classification_metrics,
    crossdata_matrix,
    crossdata_metrics,
    expected_calibration_error,
    fewshot_curve,
    fewshot_metrics,
    harmonic_mean,
    load_results,
    macro_f1,
    one_vs_rest_auc,
    summary_metrics,
)


def test_ece_by_hand():
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.2, 0.8]])
    labels = np.array([0, 1, 0, 1])
    # bins (15): 0.95 -> bin 14 (acc 1/2, conf .95); 0.55 -> bin 8 (acc 1, conf .55); 0.8 -> bin 11 (acc 1, .8)
    expected = 0.5 * abs(0.5 - 0.95) + 0.25 * abs(1 - 0.55) + 0.25 * abs(1 - 0.8)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected)
    # perfectly confident and right: 0; uniform over 15 classes and right: |1 - 1/15|
    assert expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    uniform = np.array([[1 / 15] * 15])
    assert expected_calibration_error(uniform, np.array([0])) == pytest.approx(1 - 1 / 15)


def test_auc_binary_multiclass_and_absent_classes():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 50)
    p1 = np.clip(labels * 0.3 + rng.uniform(0, 0.7, 50), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    assert one_vs_rest_auc(probs, labels) == pytest.approx(roc_auc_score(labels, p1))
    # 4 classes, class 3 absent from the labels: macro over the present classes, no crash
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = rng.dirichlet(np.ones(4), size=6)
    expected = np.mean([roc_auc_score(labels == c, probs[:, c]) for c in (0, 1, 2)])
    assert one_vs_rest_auc(probs, labels) == pytest.approx(expected)
    assert math.isnan(one_vs_rest_auc(probs[:2], labels[:2]))  # one class present: undefined


@pytest.mark.parametrize("seed", range(6))
def test_fast_auc_and_f1_equal_sklearn(seed):
    """The numpy AUC (ranks, ties averaged) and macro-F1 give sklearn's numbers, absent classes included."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 9))
    labels = rng.integers(0, n_classes - (seed % 2), 60)  # odd seeds: the last class never occurs
    probs = rng.dirichlet(np.ones(n_classes), size=60).round(1)  # rounding makes many ties
    for c in np.unique(labels):
        assert binary_auc(labels == c, probs[:, c]) == pytest.approx(roc_auc_score(labels == c, probs[:, c]))
    pred = probs.argmax(1)
    assert macro_f1(labels, pred) == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0))
    assert math.isnan(binary_auc(np.ones(5, dtype=bool), np.arange(5.0)))


def test_classification_metrics():
    labels = np.array([0, 1, 2, 2])
    probs = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.5, 0.2, 0.3]])
    m = classification_metrics(probs, labels)
    assert m["accuracy"] == pytest.approx(75.0) and m["n"] == 4
    # F1 per class: class 0: p=1/2 r=1 -> 2/3; class 1: 1; class 2: p=1 r=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 + 2 / 3) / 3)
    assert 0 <= m["ece"] <= 100 and 0 <= m["auc"] <= 100
    one = classification_metrics(np.ones((5, 1)), np.zeros(5, dtype=int))  # a single class: trivial
    assert one["accuracy"] == 100.0 and one["macro_f1"] == 100.0 and one["ece"] == 0.0 and math.isnan(one["auc"])
    with pytest.raises(ValueError, match="labels must lie in 0..2"):
        classification_metrics(probs, np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="one row per label"):
        classification_metrics(probs, labels[:3])


def test_harmonic_mean():
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(50.0, float("nan")))


def frame(rows: list[tuple]) -> pd.DataFrame:
    cols = ["method", "setting", "source", "target", "shots", "seed", "part", "n_classes", "accuracy"]
    df = pd.DataFrame(rows, columns=cols)
    df["n"], df["macro_f1"], df["auc"], df["ece"] = 10, df.accuracy - 1, df.accuracy + 1, 5.0
    return df[list(RESULT_COLUMNS)]


def test_fewshot_aggregation_means_and_std_over_seeds():
    df = frame([("coop", "fewshot", d, d, k, s, "all", 3, acc) for d, k, s, acc in [
        ("pathmnist", 16, 1, 80.0), ("pathmnist", 16, 2, 90.0),
        ("bloodmnist", 16, 1, 60.0), ("bloodmnist", 16, 2, 40.0), ("pathmnist", 1, 1, 50.0),
        ("pathmnist", 1, 2, 50.0), ("bloodmnist", 1, 1, 30.0), ("bloodmnist", 1, 2, 30.0)]])
    m = fewshot_metrics(df, ["coop"], ["pathmnist", "bloodmnist"])
    assert list(m["coop"]) == ["k1", "k16"]
    assert m["coop"]["k16"]["pathmnist"]["accuracy"] == {"mean": 85.0, "std": 5.0}  # population std
    # average: per seed (80+60)/2=70 and (90+40)/2=65 -> mean 67.5, std 2.5
    assert m["coop"]["k16"]["average"]["accuracy"] == {"mean": 67.5, "std": 2.5}
    assert m["coop"]["k16"]["average"]["ece"] == {"mean": 5.0, "std": 0.0}
    curve = fewshot_curve(df)
    assert curve.to_dict("records") == [{"method": "coop", "shots": 1, "accuracy": 40.0, "std": 0.0},
                                        {"method": "coop", "shots": 16, "accuracy": 67.5, "std": 2.5}]


def test_base2new_harmonic_mean_and_not_applicable_novel():
    rows = []
    for s, (b, n) in {1: (80.0, 40.0), 2: (60.0, 60.0)}.items():
        rows += [("coop", "base2new", "pathmnist", "pathmnist", 16, s, "base", 5, b),
                 ("coop", "base2new", "pathmnist", "pathmnist", 16, s, "novel", 4, n),
                 ("linear_probe", "base2new", "pathmnist", "pathmnist", 16, s, "base", 5, 90.0)]
    m = base2new_metrics(frame(rows))
    # the published HM: of the seed-mean base (70) and novel (50) accuracies, not the mean of per-seed HMs
    assert m["coop"]["pathmnist"]["hm"] == {"mean": pytest.approx(2 * 70 * 50 / 120, abs=1e-4)}
    hm1, hm2 = 2 * 80 * 40 / 120, 60.0  # per-seed HMs, kept as a named extra
    assert m["coop"]["pathmnist"]["hm_per_seed"] == {"mean": pytest.approx((hm1 + hm2) / 2, abs=1e-4),
                                                     "std": pytest.approx(abs(hm1 - hm2) / 2, abs=1e-4)}
    assert m["coop"]["pathmnist"]["base"]["accuracy"] == {"mean": 70.0, "std": 10.0}
    assert set(m["linear_probe"]["pathmnist"]) == {"base"}  # no novel, no HM: not applicable
    summary = summary_metrics({}, m, {})
    assert set(summary["base2new"]) == {"coop"}


def test_average_harmonic_mean_is_that_of_the_reported_average_base_and_novel():
    """CoCoOp's CLIP row: HM(69.34, 74.22) = 71.70. The average row's HM is 2ab/(a+b) of its own base a and
    novel b columns (each the mean over datasets within a seed, then over seeds), not the mean of per-dataset HMs."""
    acc = {("pathmnist", 1): (90.0, 30.0), ("pathmnist", 2): (80.0, 40.0),
           ("bloodmnist", 1): (50.0, 70.0), ("bloodmnist", 2): (60.0, 60.0)}
    rows = []
    for (ds, s), (b, n) in acc.items():
        rows += [("coop", "base2new", ds, ds, 16, s, "base", 5, b), ("coop", "base2new", ds, ds, 16, s, "novel", 4, n)]
    avg = base2new_metrics(frame(rows))["coop"]["average"]
    assert list(base2new_metrics(frame(rows), datasets=["bloodmnist", "pathmnist"])["coop"]) == [
        "bloodmnist", "pathmnist", "average"]
    a, b = avg["base"]["accuracy"]["mean"], avg["novel"]["accuracy"]["mean"]
    assert (a, b) == (70.0, 50.0)
    assert avg["hm"]["mean"] == pytest.approx(2 * a * b / (a + b), abs=1e-4)  # 58.33
    per_dataset = base2new_metrics(frame(rows))["coop"]
    assert per_dataset["pathmnist"]["hm"]["mean"] == pytest.approx(2 * 85 * 35 / 120, abs=1e-4)
    assert avg["hm"]["mean"] > (per_dataset["pathmnist"]["hm"]["mean"] + per_dataset["bloodmnist"]["hm"]["mean"]) / 2
    assert summary_metrics({}, {"coop": per_dataset}, {})["base2new"]["coop"] == avg["hm"]["mean"]
    assert float(harmonic_mean(69.34, 74.22)) == pytest.approx(71.70, abs=0.005)


def test_crossdata_off_diagonal_and_summary():
    acc = {("pathmnist", "pathmnist"): 90.0, ("pathmnist", "bloodmnist"): 30.0,
           ("bloodmnist", "bloodmnist"): 80.0, ("bloodmnist", "pathmnist"): 50.0}
    rows = [("coop", "crossdata", s, t, 16, seed, "all", 3, a + seed) for (s, t), a in acc.items() for seed in (1, 2)]
    m = crossdata_metrics(frame(rows), ["coop"], ["pathmnist", "bloodmnist"])
    assert m["coop"]["pathmnist"]["bloodmnist"]["accuracy"] == {"mean": 31.5, "std": 0.5}
    assert m["coop"]["pathmnist"]["off_diagonal"]["accuracy"]["mean"] == 31.5
    assert m["coop"]["average"]["off_diagonal"]["accuracy"] == {"mean": 41.5, "std": 0.5}
    assert m["coop"]["average"]["in_domain"]["accuracy"]["mean"] == 86.5
    matrix = crossdata_matrix(frame(rows), ["coop"], ["pathmnist", "bloodmnist"])
    assert list(zip(matrix.source, matrix.target, strict=True)) == [
        ("pathmnist", "pathmnist"), ("pathmnist", "bloodmnist"), ("bloodmnist", "pathmnist"),
        ("bloodmnist", "bloodmnist")]
    few = fewshot_metrics(frame([("coop", "fewshot", "pathmnist", "pathmnist", k, 1, "all", 3, 10.0 * k)
                                 for k in (1, 4, 16)]))
    summary = summary_metrics(few, {}, m)
    assert summary == {"fewshot": {"coop": 160.0}, "base2new": {}, "crossdata": {"coop": 41.5}}


def test_check_finite_and_load_results(tmp_path):
    check_finite({"a": {"b": 1.0, "c": [1]}, "d": True})
    with pytest.raises(ValueError, match=r"metric x.y is nan"):
        check_finite({"x": {"y": float("nan")}})
    with pytest.raises(FileNotFoundError, match="run its train stage"):
        load_results([tmp_path / "coop.csv"])
    pd.DataFrame({"method": ["coop"], "accuracy": [1.0]}).to_csv(tmp_path / "coop.csv", index=False)
    with pytest.raises(ValueError, match=r"lacks the columns \['setting'"):
        load_results([tmp_path / "coop.csv"])


# ---------------------------------------------------------------------------------------------- ECE, pinned
def reference_ece(probs, labels, n_bins: int = 15) -> float:
    """Plain-python ECE: bin i holds confidences in (i/n, (i+1)/n]; a confidence of 0 goes to the first bin and
    one above 1 (float round-off of a softmax) to the last."""
    bins: list[list[tuple[float, bool]]] = [[] for _ in range(n_bins)]
    for row, label in zip(probs, labels, strict=True):
        row = [float(p) for p in row]
        conf = max(row)
        i = 0 if conf <= 0 else n_bins - 1 if conf > 1 else next(i for i in range(n_bins) if conf <= (i + 1) / n_bins)
        bins[i].append((conf, row.index(conf) == label))
    total = 0.0
    for members in bins:
        if members:
            acc = sum(ok for _, ok in members) / len(members)
            mean_conf = sum(c for c, _ in members) / len(members)
            total += len(members) / len(labels) * abs(acc - mean_conf)
    return total


@pytest.mark.parametrize("seed", range(8))
def test_ece_equals_a_plain_15_bin_reference_on_random_predictions(seed):
    """Default bins (15) and the percent scaling of ``classification_metrics`` against the plain reference."""
    rng = np.random.default_rng(seed)
    n_classes = int(rng.integers(2, 12))
    labels = rng.integers(0, n_classes, 200)
    # sharpened or flattened Dirichlet draws: confidences over the whole (1/C, 1] range, so every bin is used
    probs = rng.dirichlet(np.full(n_classes, float(rng.choice([0.1, 0.5, 2.0]))), size=200)
    expected = reference_ece(probs, labels)
    assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)
    assert classification_metrics(probs, labels)["ece"] == pytest.approx(100 * expected, abs=1e-10)
    assert expected_calibration_error(probs, labels, n_bins=7) == pytest.approx(reference_ece(probs, labels, 7))


@pytest.mark.parametrize("seed", range(4))
def test_ece_with_confidences_exactly_at_bin_edges(seed):
    """A confidence of exactly k/15 belongs to bin k-1 (upper edge included, lower edge excluded)."""
    rng = np.random.default_rng(seed)
    conf = rng.integers(1, 16, 60) / 15  # every edge 1/15 .. 15/15
    others = rng.dirichlet(np.ones(14), size=60) * (1 - conf)[:, None]
    others = np.minimum(others, conf[:, None])  # keep the edge value the top class (rows need not sum to 1 here)
    probs = np.concatenate([conf[:, None], others], axis=1)
    labels = np.where(rng.random(60) < 0.5, 0, 1)
    assert probs.max(axis=1).tolist() == conf.tolist()
    assert expected_calibration_error(probs, labels) == pytest.approx(reference_ece(probs, labels), abs=1e-12)


def test_ece_bin_edges_by_hand():
    # 8/15 sits on the upper edge of bin 7, with 0.5 (= 7.5/15): one bin, accuracy 1/2, confidence 31/60
    probs = np.array([[8 / 15, 7 / 15], [0.5, 0.5]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(1 / 60, abs=1e-12)
    # a confidence of 0 (all-zero row) goes to bin 0, apart from 0.1 in bin 1: 0.5 * |1 - 0| + 0.5 * |0 - 0.1|
    probs = np.array([[0.0, 0.0], [0.1, 0.05]])
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.55, abs=1e-12)
    # a confidence a hair above 1 (softmax round-off) still counts, in the last bin with 0.95: |1/2 - 0.975|
    probs = np.array([[1 + 1e-9, 0.0], [0.95, 0.05]])
    assert expected_calibration_error(probs, np.array([1, 0])) == pytest.approx(0.475, abs=1e-8)
    # the percent scaling: the first case in classification_metrics
    m = classification_metrics(np.array([[8 / 15, 7 / 15], [0.5, 0.5]]), np.array([0, 1]))
    assert m["ece"] == pytest.approx(100 / 60, abs=1e-10)


# ---------------------------------------------------------------------------------------------- aggregation, pinned
def mixed_frame() -> pd.DataFrame:
    """All three settings in one table, as the runs write them: coop before zeroshot, pathmnist before bloodmnist
    (the order arguments below ask for the reverse), and every setting's rows sharing method, K and datasets with
    the others, so a setting that leaks into another changes its numbers."""
    rows = []
    for s in (1, 2):
        rows += [("coop", "fewshot", "pathmnist", "pathmnist", 16, s, "all", 9, 80.0 + s),
                 ("coop", "fewshot", "bloodmnist", "bloodmnist", 16, s, "all", 8, 60.0 + 2 * s),
                 ("zeroshot", "fewshot", "pathmnist", "pathmnist", 16, s, "all", 9, 40.0),
                 ("zeroshot", "fewshot", "bloodmnist", "bloodmnist", 16, s, "all", 8, 20.0),
                 ("zeroshot", "fewshot", "pathmnist", "pathmnist", 1, s, "all", 9, 100 / 3),
                 ("zeroshot", "fewshot", "bloodmnist", "bloodmnist", 1, s, "all", 8, 100 / 3),
                 ("coop", "base2new", "pathmnist", "pathmnist", 16, s, "base", 5, 90.0 + s),
                 ("coop", "base2new", "pathmnist", "pathmnist", 16, s, "novel", 4, 30.0),
                 ("zeroshot", "base2new", "pathmnist", "pathmnist", 16, s, "base", 5, 50.0),
                 ("zeroshot", "base2new", "pathmnist", "pathmnist", 16, s, "novel", 4, 50.0),
                 ("coop", "crossdata", "pathmnist", "pathmnist", 16, s, "all", 9, 70.0),
                 ("coop", "crossdata", "pathmnist", "bloodmnist", 16, s, "all", 8, 30.0 + s),
                 ("coop", "crossdata", "bloodmnist", "bloodmnist", 16, s, "all", 8, 50.0),
                 ("coop", "crossdata", "bloodmnist", "pathmnist", 16, s, "all", 9, 10.0 + 3 * s),
                 ("zeroshot", "crossdata", "bloodmnist", "pathmnist", 16, s, "all", 9, 5.0)]
    return frame(rows)


def stats(acc: float, std: float) -> dict:
    """The four metrics of ``frame`` rows: macro-F1 = accuracy - 1, AUC = accuracy + 1, ECE = 5 on every row."""
    return {"accuracy": {"mean": acc, "std": std}, "macro_f1": {"mean": acc - 1, "std": std},
            "auc": {"mean": acc + 1, "std": std}, "ece": {"mean": 5.0, "std": 0.0}}


def test_fewshot_metrics_whole_dict_in_the_requested_order():
    m = fewshot_metrics(mixed_frame(), ["zeroshot", "coop"], ["bloodmnist", "pathmnist"])
    third = 33.3333  # 100/3, rounded to 4 places
    assert m == {
        "zeroshot": {"k1": {"bloodmnist": stats(third, 0.0), "pathmnist": stats(third, 0.0),
                            "average": stats(third, 0.0)},
                     "k16": {"bloodmnist": stats(20.0, 0.0), "pathmnist": stats(40.0, 0.0),
                             "average": stats(30.0, 0.0)}},
        # coop: pathmnist 81, 82; bloodmnist 62, 64; per seed 71.5 and 73
        "coop": {"k16": {"bloodmnist": stats(63.0, 1.0), "pathmnist": stats(81.5, 0.5),
                         "average": stats(72.25, 0.75)}}}
    assert [list(x) for x in (m, m["zeroshot"], m["coop"]["k16"])] == [
        ["zeroshot", "coop"], ["k1", "k16"], ["bloodmnist", "pathmnist", "average"]]


def test_crossdata_metrics_whole_dict_in_the_requested_order():
    m = crossdata_metrics(mixed_frame(), ["zeroshot", "coop"], ["bloodmnist", "pathmnist"])

    def acc(mean, std):
        return {"accuracy": {"mean": mean, "std": std}}

    assert m == {
        "zeroshot": {"bloodmnist": {"pathmnist": acc(5.0, 0.0), "off_diagonal": acc(5.0, 0.0)},
                     "average": {"off_diagonal": acc(5.0, 0.0), "in_domain": {}}},
        # coop off-diagonal per seed: (31 + 13) / 2 = 22 and (32 + 16) / 2 = 24
        "coop": {"bloodmnist": {"bloodmnist": acc(50.0, 0.0), "pathmnist": acc(14.5, 1.5),
                                "off_diagonal": acc(14.5, 1.5)},
                 "pathmnist": {"bloodmnist": acc(31.5, 0.5), "pathmnist": acc(70.0, 0.0),
                               "off_diagonal": acc(31.5, 0.5)},
                 "average": {"off_diagonal": acc(23.0, 1.0), "in_domain": acc(60.0, 0.0)}}}
    assert [list(x) for x in (m, m["coop"], m["coop"]["bloodmnist"])] == [
        ["zeroshot", "coop"], ["bloodmnist", "pathmnist", "average"], ["bloodmnist", "pathmnist", "off_diagonal"]]
    assert list(m["coop"]["pathmnist"]) == ["bloodmnist", "pathmnist", "off_diagonal"]  # written the other way
    # a method trained on one dataset and tested on it only: no off-diagonal, no average
    only_diagonal = crossdata_metrics(mixed_frame().query("method == 'coop' and source == target"))
    assert only_diagonal == {"coop": {"pathmnist": {"pathmnist": acc(70.0, 0.0)},
                                      "bloodmnist": {"bloodmnist": acc(50.0, 0.0)}}}


def test_base2new_metrics_order_and_summary_of_the_mixed_table():
    b2n = base2new_metrics(mixed_frame(), ["zeroshot", "coop"])
    assert list(b2n) == ["zeroshot", "coop"]
    assert b2n["coop"]["pathmnist"]["base"] == stats(91.5, 0.5)
    assert b2n["coop"]["average"]["hm"] == {"mean": round(2 * 91.5 * 30 / 121.5, 4)}
    assert b2n["zeroshot"]["pathmnist"]["hm_per_seed"] == {"mean": 50.0, "std": 0.0}
    few = fewshot_metrics(mixed_frame())
    summary = summary_metrics(few, b2n, crossdata_metrics(mixed_frame()))
    assert summary == {"fewshot": {"coop": 72.25, "zeroshot": 30.0},
                       "base2new": {"zeroshot": 50.0, "coop": round(2 * 91.5 * 30 / 121.5, 4)},
                       "crossdata": {"coop": 23.0, "zeroshot": 5.0}}


def test_fewshot_curve_and_crossdata_matrix_in_the_requested_order():
    curve = fewshot_curve(mixed_frame(), ["zeroshot", "coop"])
    assert list(curve.columns) == ["method", "shots", "accuracy", "std"] and list(curve.index) == [0, 1, 2]
    assert curve.to_dict("records") == [{"method": "zeroshot", "shots": 1, "accuracy": 33.3333, "std": 0.0},
                                        {"method": "zeroshot", "shots": 16, "accuracy": 30.0, "std": 0.0},
                                        {"method": "coop", "shots": 16, "accuracy": 72.25, "std": 0.75}]
    assert list(fewshot_curve(mixed_frame()).method) == ["coop", "zeroshot", "zeroshot"]  # as first written
    df = mixed_frame()
    df.loc[(df.setting == "crossdata") & (df.source == "pathmnist") & (df.target == "bloodmnist"), "accuracy"] = 100 / 7
    matrix = crossdata_matrix(df, ["zeroshot", "coop"], ["bloodmnist", "pathmnist"])
    assert list(matrix.columns) == ["method", "source", "target", "accuracy"] and list(matrix.index) == [0, 1, 2, 3, 4]
    assert matrix.to_dict("records") == [
        {"method": "zeroshot", "source": "bloodmnist", "target": "pathmnist", "accuracy": 5.0},
        {"method": "coop", "source": "bloodmnist", "target": "bloodmnist", "accuracy": 50.0},
        {"method": "coop", "source": "bloodmnist", "target": "pathmnist", "accuracy": 14.5},
        {"method": "coop", "source": "pathmnist", "target": "bloodmnist", "accuracy": 14.2857},
        {"method": "coop", "source": "pathmnist", "target": "pathmnist", "accuracy": 70.0}]


def test_load_results_concatenates_with_a_fresh_index(tmp_path):
    df = mixed_frame()
    df[df.method == "coop"].to_csv(tmp_path / "coop.csv", index=False)
    df[df.method == "zeroshot"].to_csv(tmp_path / "zeroshot.csv", index=False)
    loaded = load_results([tmp_path / "coop.csv", str(tmp_path / "zeroshot.csv")])
    assert list(loaded.index) == list(range(len(df)))
    expected = pd.concat([df[df.method == "coop"], df[df.method == "zeroshot"]], ignore_index=True)
    pd.testing.assert_frame_equal(loaded, expected, check_dtype=False)
    with pytest.raises(ValueError, match="^no results files given$"):
        load_results([])


# ---------------------------------------------------------------------------------------------- edge cases, pinned
def test_ece_of_float32_probabilities_is_computed_in_float64():
    """Softmax outputs arrive as float32: the bins and means are taken in float64, as the reference does."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(5, 0.3), size=300).astype(np.float32)
    labels = rng.integers(0, 5, 300)
    assert expected_calibration_error(probs, labels) == pytest.approx(reference_ece(probs, labels), abs=1e-13)


def test_binary_auc_edges():
    # one positive above both negatives: 1; a 0/1 list is read as booleans, not as indices
    assert binary_auc(np.array([True, False, False]), np.array([0.9, 0.1, 0.5])) == 1.0
    assert binary_auc([0, 1, 1], [0.9, 0.1, 0.5]) == 0.0
    assert binary_auc([1, 0, 0, 1], [0.3, 0.3, 0.1, 0.8]) == pytest.approx(roc_auc_score([1, 0, 0, 1],
                                                                                         [0.3, 0.3, 0.1, 0.8]))
    with warnings.catch_warnings():  # a single class is undefined (NaN) without a 0/0 warning
        warnings.simplefilter("error")
        assert math.isnan(binary_auc(np.ones(4, dtype=bool), np.arange(4.0)))
        assert math.isnan(binary_auc(np.zeros(4, dtype=bool), np.arange(4.0)))


def test_two_class_auc_is_that_of_class_1_even_for_unnormalised_scores():
    labels = np.array([0, 0, 1, 1, 0])
    scores = np.array([[0.9, 0.8], [0.1, 0.2], [0.6, 0.7], [0.2, 0.9], [0.3, 0.5]])
    assert one_vs_rest_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores[:, 1]))  # 5/6
    assert one_vs_rest_auc(scores, labels) != pytest.approx(
        (roc_auc_score(labels, scores[:, 1]) + roc_auc_score(labels == 0, scores[:, 0])) / 2)


def test_classification_metrics_refuses_malformed_input_with_its_message():
    probs = np.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=re.escape("probs must be [N, C] with one row per label; got (4,) for (4,) "
                                                   "labels")):
        classification_metrics(np.full(4, 0.5), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match=re.escape("probs must be [N, C] with one row per label; got (4, 3) for "
                                                   "(3,) labels")):
        classification_metrics(probs, np.zeros(3, dtype=int))
    with pytest.raises(ValueError, match="^cannot score an empty test set$"):
        classification_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int))
    with pytest.raises(ValueError, match=re.escape("labels must lie in 0..2 (one column per class), got -1..2")):
        classification_metrics(probs, np.array([0, -1, 2, 1]))
    with pytest.raises(ValueError, match=re.escape("labels must lie in 0..2 (one column per class), got 0..3")):
        classification_metrics(probs, np.array([0, 3, 2, 1]))
    # labels 0 and C - 1 are fine; a column vector of labels is flattened
    m = classification_metrics(np.eye(3)[[0, 2, 2]], np.array([[0], [2], [1]]))
    assert m == {"accuracy": pytest.approx(200 / 3), "macro_f1": pytest.approx(100 * (1 + 0 + 2 / 3) / 3),
                 "auc": pytest.approx(100 * (1 + 0.5 + 0.75) / 3), "ece": pytest.approx(100 / 3), "n": 3}


def test_harmonic_mean_small_values_types_and_no_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert harmonic_mean(0.3, 0.6) == pytest.approx(0.4)  # a + b below 1 is still a harmonic mean
        assert harmonic_mean(0.0, 0.0) == 0.0 and harmonic_mean(0.0, 50.0) == 0.0
        out = harmonic_mean(np.array([80.0, 0.0, np.nan]), np.array([60.0, 0.0, 10.0]))
    assert type(harmonic_mean(80.0, 60.0)) is float and isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, [2 * 80 * 60 / 140, 0.0, np.nan])
    assert isinstance(harmonic_mean(np.array([1.0]), np.array([1.0])), np.ndarray)
    # a missing value given as None (an object column) counts as NaN, on either side
    np.testing.assert_allclose(harmonic_mean([80.0, None], [60.0, 50.0]), [2 * 80 * 60 / 140, np.nan])
    np.testing.assert_allclose(harmonic_mean([80.0, 50.0], [60.0, None]), [2 * 80 * 60 / 140, np.nan])


def test_load_results_and_check_finite_messages(tmp_path):
    missing = tmp_path / "coop.csv"
    message = f"results file {missing} not found; run its train stage (dvc repro)"
    with pytest.raises(FileNotFoundError, match=f"^{re.escape(message)}$"):
        load_results([missing])
    pd.DataFrame({"method": ["coop"], "accuracy": [1.0]}).to_csv(missing, index=False)
    cols = [c for c in RESULT_COLUMNS if c not in ("method", "accuracy")]
    with pytest.raises(ValueError, match=f"^{re.escape(f'{missing} lacks the columns {cols}; rerun its train stage')}"):
        load_results([missing])
    with pytest.raises(ValueError, match=r"^metric a.b.c is inf$"):
        check_finite({"a": {"b": {"c": float("inf")}}, "d": 1})
    with pytest.raises(ValueError, match=r"^metric  is -inf$"):
        check_finite(float("-inf"))
    check_finite({"a": 1, "b": {"c": 2.5, "d": True}, "e": "text"})


def test_seed_std_keeps_four_decimals():
    """Three seeds 10, 20, 20: mean 16.6667, population std 4.714 (4.71405 before rounding)."""
    df = frame([("coop", "fewshot", "pathmnist", "pathmnist", 16, s, "all", 3, a) for s, a in ((1, 10.0), (2, 20.0),
                                                                                             (3, 20.0))])
    assert fewshot_metrics(df)["coop"]["k16"]["pathmnist"]["accuracy"] == {"mean": 16.6667, "std": 4.714}
