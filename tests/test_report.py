"""Paper-layout tables and figures from a results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biovlm.data import DATASETS
from biovlm.evaluate import RESULT_COLUMNS
from biovlm.report import base2new_tables, fewshot_tables, pivot_table, to_latex, to_markdown, write_report

METHODS = ["zeroshot", "coop", "linear_probe"]
DATASETS3 = ["pathmnist", "breastmnist", "bloodmnist"]


def results(seed: int = 0) -> pd.DataFrame:
    """Every setting for three methods (linear_probe without novel and crossdata rows, as the runs write it)."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(method, setting, source, target, shots, s, part, n_classes):
        acc = 100.0 if n_classes == 1 else float(rng.uniform(30, 90))
        rows.append({"method": method, "setting": setting, "source": source, "target": target, "shots": shots,
                     "seed": s, "part": part, "n_classes": n_classes, "n": 50, "accuracy": acc,
                     "macro_f1": acc - 5, "auc": np.nan if n_classes == 1 else acc + 5, "ece": 10.0})

    for m in METHODS:
        for ds in DATASETS3:
            c = DATASETS[ds].n_classes
            nb = -(-c // 2)
            for s in (1, 2):
                for k in (1, 16):
                    add(m, "fewshot", ds, ds, k, s, "all", c)
                add(m, "base2new", ds, ds, 16, s, "base", nb)
                if m != "linear_probe":
                    add(m, "base2new", ds, ds, 16, s, "novel", c - nb)
                    for t in DATASETS3:
                        add(m, "crossdata", ds, t, 16, s, "all", DATASETS[t].n_classes)
    return pd.DataFrame(rows)[list(RESULT_COLUMNS)]


def test_pivot_table_mean_std_and_average_row():
    values = pd.DataFrame({"row": ["a", "a", "b", "b", "a", "a", "b", "b"],
                           "method": ["x"] * 4 + ["y"] * 4, "seed": [1, 2, 1, 2] * 2,
                           "value": [80.0, 90.0, 60.0, 40.0, 10.0, 10.0, np.nan, np.nan]})
    t = pivot_table(values, ["a", "b"], ["x", "y"], "t", "caption")
    assert t.mean.at["a", "x"] == 85.0 and t.std.at["a", "x"] == 5.0
    assert t.mean.at["Average", "x"] == 67.5 and t.std.at["Average", "x"] == 2.5
    assert np.isnan(t.mean.at["Average", "y"])  # y lacks row b: no average over a subset
    md = to_markdown(t)
    assert "| a | **85.0 ± 5.0** | 10.0 ± 0.0 |" in md and "| b | **50.0 ± 10.0** | n/a |" in md
    assert "| **Average** | **67.5 ± 2.5** | n/a |" in md
    tex = to_latex(t)
    assert r"\textbf{85.0 $\pm$ 5.0}" in tex and r"\toprule" in tex and "--" in tex


def test_lower_is_better_for_ece():
    t = fewshot_tables(results(), METHODS, DATASETS3)
    ece = next(x for x in t if x.name.endswith("_ece"))
    assert not ece.higher_is_better
    names = [x.name for x in t]
    assert names == ["fewshot_k1_accuracy", "fewshot_k16_accuracy", "fewshot_k16_macro_f1", "fewshot_k16_auc",
                     "fewshot_k16_ece"]


def test_base2new_tables_flag_trivial_and_not_applicable():
    base, novel, hm = base2new_tables(results(), METHODS, DATASETS3)
    assert base.marked_rows == ["breastmnist"] and base.mean.at["breastmnist", "coop"] == 100.0
    assert np.isnan(novel.mean.at["pathmnist", "linear_probe"]) and not np.isnan(base.mean.at["pathmnist",
                                                                                               "linear_probe"])
    md = to_markdown(hm)
    # the published HM: of the mean base and novel cells, average row included, shown without a std
    for row in ("pathmnist", "Average"):
        a, b = base.mean.at[row, "coop"], novel.mean.at[row, "coop"]
        assert hm.mean.at[row, "coop"] == pytest.approx(2 * a * b / (a + b))
    assert f"| {2 * a * b / (a + b):.1f} |" in md.split("**Average**")[1].split("\n")[0] + " |"
    assert "| breastmnist † |" in md and "n/a: the method cannot classify classes it was not trained on." in md
    assert r"breastmnist$^\dagger$" in to_latex(hm)


def test_write_report_files(tmp_path):
    df = results()
    paths = write_report(df, tmp_path, METHODS, DATASETS3, header="Configuration: test")
    md = (tmp_path / "report.md").read_text()
    tex = (tmp_path / "tables.tex").read_text()
    assert "Configuration: test" in md and "HM(mean base, mean novel)" in md and "docs/protocol.md" in md
    for caption in ("Few-shot accuracy (%), K = 16", "Base-to-novel accuracy (%), harmonic mean",
                    "Cross-dataset accuracy (%): trained on the row's dataset",
                    "Cross-dataset accuracy (%) of coop: rows are sources"):
        assert caption in md
    assert "| Dataset | zeroshot | coop | linear_probe |" in md
    assert "n/a: linear_probe cannot classify another dataset's classes." in md
    assert tex.count(r"\begin{table}") == tex.count(r"\end{table}") == 5 + 3 + 1 + 2
    assert r"linear\_probe" in tex and "linear_probe" not in tex.replace(r"linear\_probe", "")
    figures = sorted(p.name for p in paths if p.suffix == ".png")
    assert figures == ["base2new.png", "crossdata_heatmap.png", "fewshot_average.png", "fewshot_per_dataset.png"]
    for name in figures:
        data = (tmp_path / "figures" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"figures/{name}" in md


def test_report_of_a_partial_run(tmp_path):
    """Only the few-shot setting: no empty sections, no crash."""
    df = results()
    df = df[df.setting == "fewshot"]
    write_report(df, tmp_path, METHODS, DATASETS3)
    md = (tmp_path / "report.md").read_text()
    assert "## Few-shot" in md and "Base-to-novel" not in md and "Cross-dataset" not in md


@pytest.mark.parametrize("metric", ["accuracy", "ece"])
def test_average_row_is_mean_of_per_seed_dataset_averages(metric):
    df = results()
    t = next(x for x in fewshot_tables(df, METHODS, DATASETS3) if x.name == f"fewshot_k16_{metric}")
    rows = df[(df.setting == "fewshot") & (df.shots == 16) & (df.method == "coop")]
    per_seed = rows.groupby("seed")[metric].mean()
    assert t.mean.at["Average", "coop"] == pytest.approx(per_seed.mean())
    assert t.std.at["Average", "coop"] == pytest.approx(per_seed.std(ddof=0))
