"""Paper-layout tables and figures from a results table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from biovlm.data import DATASETS
from biovlm.evaluate import RESULT_COLUMNS
from biovlm.methods import METHOD_NAMES
from biovlm.plots import SYNTHETIC_NOTE, plot_base2new, plot_crossdata, plot_fewshot
from biovlm.report import (
    COLUMN_PT,
    Table,
    _tex_escape,
    base2new_tables,
    crossdata_tables,
    fewshot_tables,
    latex_width_pt,
    ordered,
    pivot_table,
    text_width_pt,
    to_latex,
    to_markdown,
    write_report,
)

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
    t2 = pivot_table(values, ["c", "b", "a"], ["y", "x"], "t", "caption")  # c: no values at all
    assert list(t2.mean.index) == list(t2.std.index) == ["c", "b", "a", "Average"]
    assert list(t2.mean.columns) == ["y", "x"] and t2.mean["x"].isna().tolist() == [True, False, False, True]
    md = to_markdown(t)
    assert "| a | **85.0 ± 5.0** | 10.0 ± 0.0 |" in md and "| b | **50.0 ± 10.0** | n/a |" in md
    assert "| **Average** | **67.5 ± 2.5** | n/a |" in md
    tex = to_latex(t)
    assert r"\textbf{85.0}$_{\pm 5.0}$" in tex and r"\toprule" in tex and "& n/a \\" in tex


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
    assert "| BreastMNIST † |" in md and "n/a: Linear probe cannot classify classes it was not trained on." in md
    assert r"BreastMNIST$^\dagger$" in to_latex(hm)


def test_write_report_files(tmp_path):
    df = results()
    paths = write_report(df, tmp_path, METHODS, DATASETS3, header="Configuration: test")
    md = (tmp_path / "report.md").read_text()
    tex = (tmp_path / "tables.tex").read_text()
    assert "Configuration: test" in md and "HM(mean base, mean novel)" in md and "docs/protocol.md" in md
    for caption in ("Few-shot accuracy (%), K = 16", "Base-to-novel accuracy (%), harmonic mean",
                    "Cross-dataset accuracy (%): trained on the row's dataset",
                    "Cross-dataset accuracy (%) of CoOp: rows are sources"):
        assert caption in md
    assert "| Dataset | Zero-shot | CoOp | Linear probe |" in md and "| PathMNIST | " in md
    assert "n/a: Linear probe cannot classify another dataset's classes." in md
    assert "SYNTHETIC" not in md + tex and "Synthetic data" not in md + tex
    tables = tex.count(r"\begin{table}") + tex.count(r"\begin{table*}")
    assert tables == tex.count(r"\end{table}") + tex.count(r"\end{table*}") == 5 + 3 + 1 + 2
    # display names, never raw ids, in what LaTeX prints (the comments and labels keep the ids)
    printed = "\n".join(line for line in tex.splitlines() if not line.startswith(("%", r"\label")))
    assert r"\begin{tabular}[b]{@{}c@{}}Linear\\probe\end{tabular}" in printed and "PathMNIST" in printed
    assert "linear" not in printed and "coop" not in printed and "pathmnist" not in printed
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
    assert md.startswith("# biovlm benchmark report\n\nCells are mean ± std over seeds")  # no header given
    assert "## Few-shot" in md and "Base-to-novel" not in md and "Cross-dataset" not in md
    write_report(df, tmp_path, METHODS, DATASETS3)  # a rerun writes over the last report
    assert (tmp_path / "report.md").read_text() == md
    write_report(results().query("setting != 'base2new'"), tmp_path, METHODS, DATASETS3)  # a middle one missing
    md = (tmp_path / "report.md").read_text()
    assert "## Few-shot" in md and "## Base-to-novel" not in md and "## Cross-dataset" in md


@pytest.mark.parametrize("metric", ["accuracy", "ece"])
def test_average_row_is_mean_of_per_seed_dataset_averages(metric):
    df = results()
    t = next(x for x in fewshot_tables(df, METHODS, DATASETS3) if x.name == f"fewshot_k16_{metric}")
    rows = df[(df.setting == "fewshot") & (df.shots == 16) & (df.method == "coop")]
    per_seed = rows.groupby("seed")[metric].mean()
    assert t.mean.at["Average", "coop"] == pytest.approx(per_seed.mean())
    assert t.std.at["Average", "coop"] == pytest.approx(per_seed.std(ddof=0))


# ---------------------------------------------------------------------------------------------- golden text
def small_table() -> Table:
    """m_1: a 80/90, b 60/40; m2: a 85.02/85.06, b 70/70; m3 only row a (no average). Means, stds by hand."""
    values = pd.DataFrame({"row": ["a", "a", "b", "b"] * 2 + ["a", "a"],
                           "method": ["m_1"] * 4 + ["m2"] * 4 + ["m3"] * 2, "seed": [1, 2] * 5,
                           "value": [80.0, 90.0, 60.0, 40.0, 85.02, 85.06, 70.0, 70.0, 10.0, 10.0]})
    table = pivot_table(values, ["a", "b"], ["m_1", "m2", "m3"], "t_x", "Acc (%) of m_1 & m2")
    table.notes, table.marked_rows = ["note one", "note † two"], ["b"]
    return table


def test_markdown_golden_text_bolds_the_best_rounded_mean():
    """Row a: 85.0 and 85.04 both show as 85.0, so both are bold; m3 lacks row b, so it has no average."""
    assert to_markdown(small_table()) == (
        "**Acc (%) of m_1 & m2**\n"
        "\n"
        "| Dataset | m_1 | m2 | m3 |\n"
        "|---|---:|---:|---:|\n"
        "| a | **85.0 ± 5.0** | **85.0 ± 0.0** | 10.0 ± 0.0 |\n"
        "| b † | 50.0 ± 10.0 | **70.0 ± 0.0** | n/a |\n"
        "| **Average** | 67.5 ± 2.5 | **77.5 ± 0.0** | n/a |\n"
        "\n"
        "note one  \n"
        "note † two\n")


def test_latex_golden_text():
    """The std as a subscript, n/a for a missing mean, the table shrunk to the line width only when wider."""
    assert to_latex(small_table()) == (
        "% t_x: natural width about 170 pt (estimated, Computer Modern at \\small); fits a column; shrunk to "
        "\\linewidth if wider\n"
        "\\begin{table}[t]\n"
        "\\centering\n"
        "\\small\n"
        "\\caption{Acc (\\%) of m\\_1 \\& m2}\n"
        "\\label{tab:t_x}\n"
        "\\resizebox{\\ifdim\\width>\\linewidth\\linewidth\\else\\width\\fi}{!}{%\n"
        "\\begin{tabular}{lccc}\n"
        "\\toprule\n"
        "Dataset & m\\_1 & m2 & m3 \\\\\n"
        "\\midrule\n"
        "a & \\textbf{85.0}$_{\\pm 5.0}$ & \\textbf{85.0}$_{\\pm 0.0}$ & 10.0$_{\\pm 0.0}$ \\\\\n"
        "b$^\\dagger$ & 50.0$_{\\pm 10.0}$ & \\textbf{70.0}$_{\\pm 0.0}$ & n/a \\\\\n"
        "\\midrule\n"
        "Average & 67.5$_{\\pm 2.5}$ & \\textbf{77.5}$_{\\pm 0.0}$ & n/a \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}}\n"
        "\\par\\footnotesize note one note $^\\dagger$ two\n"
        "\\end{table}\n")


def test_latex_width_estimate_from_computer_modern_metrics():
    r"""TeX's cmr10 metrics at \small (9 pt): digits 0.5 em, "." 0.278 em; the std a 6 pt subscript.
    small_table: first column "Average" (A .75 v .528 e .444 r .392 a .5 g .5 e .444 = 3.558 em) = 32.0 pt;
    m_1 widest cell 50.0 + ±10.0 = 16.0 + (0.778 + 3 x 0.5 + 0.278) x 6 = 31.3 pt; m2 bold 85.0 (x 1.15) + ±0.0 =
    18.4 + 12.3 = 30.7 pt; m3 10.0 + ±0.0 = 28.3 pt; plus 6 pt on each side of the four columns: 170.4 pt."""
    assert text_width_pt("85.0") == pytest.approx(16.0, abs=0.01)
    assert text_width_pt("±5.0", 6.0) == pytest.approx(12.33, abs=0.01)
    assert text_width_pt("Average") == pytest.approx(32.0, abs=0.05)
    assert latex_width_pt(small_table()) == pytest.approx(170.4, abs=0.2)


def paper_size_table() -> Table:
    """Every method on every dataset (the paper's widest results table), two seeds."""
    rng = np.random.default_rng(0)
    values = pd.DataFrame([(d, m, s, rng.uniform(10, 99)) for d in DATASETS for m in METHOD_NAMES for s in (1, 2)],
                          columns=["row", "method", "seed", "value"])
    return pivot_table(values, list(DATASETS), METHOD_NAMES, "wide", "Accuracy (%)")


def test_latex_tables_fit_a_column_or_the_page_and_are_shrunk_only_when_wider():
    shrink = r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%"
    narrow, wide = small_table(), paper_size_table()
    assert latex_width_pt(narrow) <= COLUMN_PT < latex_width_pt(wide)
    assert to_latex(narrow).splitlines()[1:2] == [r"\begin{table}[t]"] and shrink in to_latex(narrow)
    tex = to_latex(wide)
    assert tex.splitlines()[1] == r"\begin{table*}[t]" and tex.endswith("\\end{tabular}}\n\\end{table*}\n")
    assert tex.count(shrink) == 1 and "spans the page (table*)" in tex.splitlines()[0]
    # nine methods x 11 datasets: close to a two-column page's 505 pt, so barely shrunk there
    assert 450 < latex_width_pt(wide) < 580
    # stacked titles of names with a space: the widest column title is CLIP-Adapter, not "Zero-shot + attributes"
    assert r"\begin{tabular}[b]{@{}c@{}}Zero-shot +\\attributes\end{tabular}" in tex


def test_synthetic_report_marks_every_table(tmp_path):
    write_report(results(), tmp_path, METHODS, DATASETS3, synthetic=True)
    md, tex = (tmp_path / "report.md").read_text(), (tmp_path / "tables.tex").read_text()
    assert md.startswith(f"# biovlm benchmark report\n\n> **{SYNTHETIC_NOTE}**\n\n")
    captions = [line for line in md.splitlines() if line.startswith("**") and line.endswith("**")]
    assert len(captions) == 11 and all(c.startswith("**SYNTHETIC DATA: ") for c in captions)
    assert md.count(SYNTHETIC_NOTE) == 1 + 11
    assert tex.count(r"\caption{SYNTHETIC DATA: ") == tex.count(r"\caption{") == 11
    assert tex.count(SYNTHETIC_NOTE) == 1 + 11  # the file's header comment and each table's note
    plain = tmp_path / "plain"
    write_report(results(), plain, METHODS, DATASETS3)
    for name in ("fewshot_average.png", "base2new.png", "crossdata_heatmap.png"):  # the figures are marked too
        assert (tmp_path / "figures" / name).read_bytes() != (plain / "figures" / name).read_bytes()


def test_latex_file_has_balanced_braces_and_environments(tmp_path):
    write_report(results(), tmp_path, METHODS, DATASETS3, synthetic=True)
    tex = (tmp_path / "tables.tex").read_text()
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%")).replace(r"\%", "")
    depth = 0
    for char in body:
        depth += {"{": 1, "}": -1}.get(char, 0)
        assert depth >= 0
    assert depth == 0
    for env in ("table", "table*", "tabular"):
        assert body.count(rf"\begin{{{env}}}") == body.count(rf"\end{{{env}}}")
    assert body.count(r"\begin{table}") + body.count(r"\begin{table*}") == body.count(r"\begin{tabular}{l") == 11


def test_latex_without_notes_and_escaping():
    table = small_table()
    table.notes, table.marked_rows, table.row_title = [], [], "Source / target"
    tex = to_latex(table)
    assert "\\footnotesize" not in tex and "$^\\dagger$" not in tex
    assert tex.endswith("\\bottomrule\n\\end{tabular}}\n\\end{table}\n")
    assert "\nSource / target & m\\_1 & m2 & m3 \\\\\n" in tex
    assert _tex_escape("a\\b_c%d&e") == "a\\textbackslash{}b\\_c\\%d\\&e"


def test_lower_is_better_bolds_the_minimum_and_unbolded_tables():
    table = small_table()
    table.higher_is_better = False
    lines = to_markdown(table).splitlines()
    assert lines[4:7] == ["| a | 85.0 ± 5.0 | 85.0 ± 0.0 | **10.0 ± 0.0** |",
                          "| b † | **50.0 ± 10.0** | 70.0 ± 0.0 | n/a |",
                          "| **Average** | **67.5 ± 2.5** | 77.5 ± 0.0 | n/a |"]
    assert "Average & \\textbf{67.5}$_{\\pm 2.5}$ & 77.5$_{\\pm 0.0}$ & n/a \\\\\n" in to_latex(table)
    table.bold = False
    assert "**" not in "".join(to_markdown(table).splitlines()[2:]).replace("**Average**", "")
    assert "\\textbf" not in to_latex(table)


def test_cells_without_std_and_with_an_undefined_std():
    """No std (the HM table) prints the mean alone; a NaN std prints as 0.0."""
    mean = pd.DataFrame({"x": [58.333, 40.0], "y": [12.0, np.nan]}, index=["a", "Average"])
    std = pd.DataFrame({"x": [np.nan, 1.25], "y": [np.nan, np.nan]}, index=["a", "Average"])
    table = Table("hm", "HM", mean, std)
    assert to_markdown(table).splitlines()[4:6] == ["| a | **58.3 ± 0.0** | 12.0 ± 0.0 |",
                                                    "| **Average** | **40.0 ± 1.2** | n/a |"]
    table.std = None
    assert to_markdown(table).splitlines()[4:6] == ["| a | **58.3** | 12.0 |", "| **Average** | **40.0** | n/a |"]
    assert "a & \\textbf{58.3} & 12.0 \\\\\n" in to_latex(table)


def b2n_rows() -> pd.DataFrame:
    """coop: d1 (three classes: two base, one novel) base 80/60, novel 40/60; d2 (two classes: one base, one
    novel; trivial) base 90/90, novel 30/50.
    linear_probe: base only, d1 90/90, d2 70/80."""
    rows = []
    for s, (b1, n1, b2, n2, lp1, lp2) in {1: (80, 40, 90, 30, 90, 70), 2: (60, 60, 90, 50, 90, 80)}.items():
        rows += [("coop", "d1", s, "base", 2, b1), ("coop", "d1", s, "novel", 1, n1),
                 ("coop", "d2", s, "base", 1, b2), ("coop", "d2", s, "novel", 1, n2),
                 ("linear_probe", "d1", s, "base", 2, lp1), ("linear_probe", "d2", s, "base", 1, lp2)]
    df = pd.DataFrame([(m, "base2new", d, d, 16, s, p, c, 50, float(a), 0.0, 0.0, 0.0) for m, d, s, p, c, a in rows],
                      columns=list(RESULT_COLUMNS))
    return df


def test_base2new_tables_hand_computed_cells():
    """HM per dataset of the seed means: d1 HM(70, 50) = 58.33, d2 HM(90, 40) = 55.38; the average row is HM of
    the average base (80) and novel (45) = 57.6, not the mean of the dataset HMs (56.86)."""
    base, novel, hm = base2new_tables(b2n_rows(), ["coop", "linear_probe"], ["d1", "d2"])
    assert [t.name for t in (base, novel, hm)] == ["base2new_base", "base2new_novel", "base2new_hm"]
    assert to_markdown(base) == (
        "**Base-to-novel accuracy (%), base classes, 16 shots per base class**\n"
        "\n"
        "| Dataset | CoOp | Linear probe |\n"
        "|---|---:|---:|\n"
        "| d1 | 70.0 ± 10.0 | **90.0 ± 0.0** |\n"
        "| d2 † | **90.0 ± 0.0** | 75.0 ± 5.0 |\n"
        "| **Average** | 80.0 ± 5.0 | **82.5 ± 2.5** |\n"
        "\n"
        "† two classes: base and novel hold one class each, so accuracy is trivially 100%.\n")
    assert to_markdown(novel) == (
        "**Base-to-novel accuracy (%), novel classes, 16 shots per base class**\n"
        "\n"
        "| Dataset | CoOp | Linear probe |\n"
        "|---|---:|---:|\n"
        "| d1 | **50.0 ± 10.0** | n/a |\n"
        "| d2 † | **40.0 ± 10.0** | n/a |\n"
        "| **Average** | **45.0 ± 10.0** | n/a |\n"
        "\n"
        "† two classes: base and novel hold one class each, so accuracy is trivially 100%.  \n"
        "n/a: Linear probe cannot classify classes it was not trained on.\n")
    assert to_markdown(hm) == (
        "**Base-to-novel accuracy (%), harmonic mean, 16 shots per base class (HM of the mean base and novel "
        "accuracies)**\n"
        "\n"
        "| Dataset | CoOp | Linear probe |\n"
        "|---|---:|---:|\n"
        "| d1 | **58.3** | n/a |\n"
        "| d2 † | **55.4** | n/a |\n"
        "| **Average** | **57.6** | n/a |\n"
        "\n"
        "† two classes: base and novel hold one class each, so accuracy is trivially 100%.  \n"
        "n/a: Linear probe cannot classify classes it was not trained on.\n")
    assert hm.mean.at["Average", "coop"] == pytest.approx(57.6)
    assert hm.std is None and hm.marked_rows == ["d2"]


def test_base2new_without_trivial_rows_or_missing_novel():
    df = b2n_rows()
    df = df[df.method == "coop"].assign(n_classes=3)
    base, novel, hm = base2new_tables(df, ["coop"], ["d1", "d2"])
    assert base.notes == novel.notes == hm.notes == [] and hm.marked_rows == []
    # a method without base-to-novel runs: n/a everywhere, but the base table never blames unseen classes
    base, novel, hm = base2new_tables(df, ["coop", "zeroshot"], ["d1", "d2"])
    assert base.mean["zeroshot"].isna().all()
    assert base.notes == novel.notes == hm.notes == ["n/a: no base-to-novel results for Zero-shot."]


def test_base2new_tables_of_the_linear_probe_alone():
    """No novel rows at all: the novel and HM tables are n/a throughout."""
    base, novel, hm = base2new_tables(b2n_rows().query("method == 'linear_probe'"), ["linear_probe"], ["d1", "d2"])
    assert base.mean["linear_probe"].tolist() == [90.0, 75.0, 82.5]
    assert novel.mean["linear_probe"].isna().all() and hm.mean["linear_probe"].isna().all()


def crossdata_rows() -> pd.DataFrame:
    """coop trained on each of d1, d2, d3 and tested on all three, seeds 1 and 2 (diagonal 90, 80, 70)."""
    acc = {1: {("d1", "d2"): 30, ("d1", "d3"): 50, ("d2", "d1"): 60, ("d2", "d3"): 70, ("d3", "d1"): 20,
               ("d3", "d2"): 40},
           2: {("d1", "d2"): 40, ("d1", "d3"): 60, ("d2", "d1"): 60, ("d2", "d3"): 70, ("d3", "d1"): 30,
               ("d3", "d2"): 30}}
    rows = []
    for s, pairs in acc.items():
        pairs = {**pairs, ("d1", "d1"): 90, ("d2", "d2"): 80, ("d3", "d3"): 70}
        rows += [("coop", "crossdata", src, tgt, 16, s, "all", 4, 50, float(a), 0.0, 0.0, 0.0)
                 for (src, tgt), a in pairs.items()]
    return pd.DataFrame(rows, columns=list(RESULT_COLUMNS))


def test_crossdata_tables_transfer_means_by_hand():
    """Transfer cell: mean over the other two targets within a seed, then over seeds: d1 (40, 50) -> 45 ± 5,
    d2 (65, 65), d3 (30, 30); average (45, 48.33) -> 46.7 ± 1.7. The diagonal stays out of the transfer."""
    summary, matrix = crossdata_tables(crossdata_rows(), ["coop", "linear_probe"], ["d1", "d2", "d3"])
    assert summary.name == "crossdata_transfer" and matrix.name == "crossdata_matrix_coop"
    assert to_markdown(summary) == (
        "**Cross-dataset accuracy (%): trained on the row's dataset (16 shots), mean over the other datasets**\n"
        "\n"
        "| Dataset | CoOp | Linear probe |\n"
        "|---|---:|---:|\n"
        "| d1 | **45.0 ± 5.0** | n/a |\n"
        "| d2 | **65.0 ± 0.0** | n/a |\n"
        "| d3 | **30.0 ± 0.0** | n/a |\n"
        "| **Average** | **46.7 ± 1.7** | n/a |\n"
        "\n"
        "n/a: Linear probe cannot classify another dataset's classes.\n")
    assert to_markdown(matrix) == (
        "**Cross-dataset accuracy (%) of CoOp: rows are sources, columns targets (in italics: in-domain, the "
        "source's own test set)**\n"
        "\n"
        "| Source / target | d1 | d2 | d3 |\n"
        "|---|---:|---:|---:|\n"
        "| d1 | *90.0 ± 0.0* | 35.0 ± 5.0 | 55.0 ± 5.0 |\n"
        "| d2 | 60.0 ± 0.0 | *80.0 ± 0.0* | 70.0 ± 0.0 |\n"
        "| d3 | 25.0 ± 5.0 | 35.0 ± 5.0 | *70.0 ± 0.0* |\n")
    assert matrix.italic_cells == [("d1", "d1"), ("d2", "d2"), ("d3", "d3")] and matrix.rotate_headers
    assert "\\rotatebox{90}{d2}" in to_latex(matrix) and "\\textit{80.0}$_{\\pm 0.0}$" in to_latex(matrix)
    only = crossdata_tables(crossdata_rows(), ["coop"], ["d1", "d2", "d3"])
    assert only[0].notes == []
    assert crossdata_tables(crossdata_rows().assign(setting="fewshot"), ["coop"], ["d1"]) == []
    two = pd.concat([crossdata_rows().assign(method="zeroshot"), crossdata_rows()], ignore_index=True)
    tables = crossdata_tables(two, ["coop", "linear_probe", "zeroshot", "clip_adapter"], ["d3", "d1", "d2"])
    assert [t.name for t in tables] == ["crossdata_transfer", "crossdata_matrix_coop", "crossdata_matrix_zeroshot"]
    assert tables[0].notes == ["n/a: Linear probe, CLIP-Adapter cannot classify another dataset's classes."]
    assert list(tables[0].mean.index) == ["d3", "d1", "d2", "Average"]
    assert list(tables[1].mean.index) == list(tables[1].mean.columns) == ["d3", "d1", "d2"]


def test_fewshot_tables_captions_and_ece_bolds_the_lowest():
    rows = [(m, "fewshot", "d1", "d1", k, s, "all", 3, 50, acc + k, acc - 10 + k, acc + 5 + k, ece - k / 16)
            for m, acc, ece in (("coop", 64.0, 5.0), ("zeroshot", 44.0, 10.0)) for k in (1, 4, 16) for s in (1, 2)]
    tables = fewshot_tables(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)), ["zeroshot", "coop"], ["d1"])
    assert [to_markdown(t).splitlines()[0] for t in tables] == [
        "**Few-shot accuracy (%), K = 1 (shots per class)**", "**Few-shot accuracy (%), K = 4 (shots per class)**",
        "**Few-shot accuracy (%), K = 16 (shots per class)**", "**Few-shot macro-F1 (%), K = 16**",
        "**Few-shot one-vs-rest AUC (%), K = 16**", "**Few-shot ECE (15 bins) (%), K = 16**"]
    assert [t.name for t in tables] == ["fewshot_k1_accuracy", "fewshot_k4_accuracy", "fewshot_k16_accuracy",
                                        "fewshot_k16_macro_f1", "fewshot_k16_auc", "fewshot_k16_ece"]
    assert to_markdown(tables[1]).splitlines()[4] == "| d1 | 48.0 ± 0.0 | **68.0 ± 0.0** |"
    assert to_markdown(tables[3]).splitlines()[4] == "| d1 | 50.0 ± 0.0 | **70.0 ± 0.0** |"
    assert to_markdown(tables[5]).splitlines()[4:6] == ["| d1 | 9.0 ± 0.0 | **4.0 ± 0.0** |",
                                                        "| **Average** | 9.0 ± 0.0 | **4.0 ± 0.0** |"]
    assert [t.higher_is_better for t in tables] == [True, True, True, True, True, False]
    assert fewshot_tables(pd.DataFrame(rows, columns=list(RESULT_COLUMNS)).assign(part="base"), ["coop"], ["d1"]) == []


def test_write_report_layout(tmp_path):
    """The report's fixed text and the order of its sections, figures and tables, in the requested method and
    dataset order (not the order of the results); tables.tex holds the same tables; the figures are biovlm.plots'."""
    few = [(m, "fewshot", d, d, k, s, "all", 3, 50, 60.0 + s, 50.0, 70.0, 5.0)
           for m in ("coop", "linear_probe") for d in ("d1", "d2") for k in (1, 16) for s in (1, 2)]
    df = pd.concat([pd.DataFrame(few, columns=list(RESULT_COLUMNS)), b2n_rows(), crossdata_rows()],
                   ignore_index=True)
    methods, datasets = ["linear_probe", "coop"], ["d2", "d1", "d3"]
    paths = write_report(df, tmp_path / "out", methods, datasets, header="Run: test")
    out = tmp_path / "out"
    figures = [out / "figures" / f for f in ("fewshot_average.png", "fewshot_per_dataset.png", "base2new.png",
                                             "crossdata_heatmap.png")]
    assert paths[:2] == [out / "report.md", out / "tables.tex"] and sorted(paths[2:]) == sorted(figures)
    md = (out / "report.md").read_text()
    assert md.startswith("# biovlm benchmark report\n\nRun: test\n\n"
                         "Cells are mean ± std over seeds, in percent; the best mean of each row is bold.\n\n"
                         "Protocol (docs/protocol.md): each run sees only its own K shots and min(K, 4) validation "
                         "shots per training class; ")
    assert "HM(mean base, mean novel), as CoCoOp, BiomedCoOp and BioVLM report it.\n\n## Few-shot\n\n![" in md
    outline = [line for line in md.splitlines() if line.startswith(("## ", "![", "**Few", "**Base", "**Cross"))]
    assert outline == [
        "## Few-shot", "![fewshot_average](figures/fewshot_average.png)",
        "![fewshot_per_dataset](figures/fewshot_per_dataset.png)",
        "**Few-shot accuracy (%), K = 1 (shots per class)**", "**Few-shot accuracy (%), K = 16 (shots per class)**",
        "**Few-shot macro-F1 (%), K = 16**", "**Few-shot one-vs-rest AUC (%), K = 16**",
        "**Few-shot ECE (15 bins) (%), K = 16**",
        "## Base-to-novel", "![base2new](figures/base2new.png)",
        "**Base-to-novel accuracy (%), base classes, 16 shots per base class**",
        "**Base-to-novel accuracy (%), novel classes, 16 shots per base class**",
        "**Base-to-novel accuracy (%), harmonic mean, 16 shots per base class (HM of the mean base and novel "
        "accuracies)**",
        "## Cross-dataset", "![crossdata_heatmap](figures/crossdata_heatmap.png)",
        "**Cross-dataset accuracy (%): trained on the row's dataset (16 shots), mean over the other datasets**",
        "**Cross-dataset accuracy (%) of CoOp: rows are sources, columns targets (in italics: in-domain, the source's "
        "own test set)**"]
    # each table as to_markdown writes it (ending in a newline), then a blank line; the file ends with one newline
    assert ("| **Average** | n/a | **46.7 ± 1.7** |\n\nn/a: Linear probe cannot classify another dataset's classes."
            "\n\n\n**Cross-dataset accuracy (%) of CoOp") in md
    assert "n/a: Linear probe cannot classify classes it was not trained on.\n\n\n**Base-to-novel" in md
    assert "![crossdata_heatmap](figures/crossdata_heatmap.png)\n\n**Cross-dataset accuracy (%): trained" in md
    assert "| Dataset | Linear probe | CoOp |\n" in md and "| Source / target | d2 | d1 | d3 |\n" in md
    assert md.endswith("| d3 | 35.0 ± 5.0 | 25.0 ± 5.0 | *70.0 ± 0.0* |\n")
    tex = (out / "tables.tex").read_text()
    assert tex.startswith("% biovlm benchmark tables (generated by `dvc repro report`); needs "
                          "\\usepackage{booktabs,graphicx}\n\n% fewshot_k1_accuracy: natural width about ")
    assert tex.count("\\end{table}\n\n\n% ") == 5 + 3 + 2 - 1 and tex.endswith("\\end{table}\n")
    direct = tmp_path / "direct"
    direct.mkdir()
    drawn = [*plot_fewshot(df, methods, datasets, direct), *plot_base2new(df, methods, direct),
             *plot_crossdata(df, methods, datasets, direct)]
    assert [p.name for p in drawn] == [p.name for p in paths[2:]]
    for p in drawn:
        assert p.read_bytes() == (out / "figures" / p.name).read_bytes(), p.name


def test_ordered_puts_the_preferred_first_then_the_rest_as_they_appear():
    assert ordered(["b", "a", "b", "c", "d"], ["c", "x", "a"]) == ["c", "a", "b", "d"]
    assert ordered(["b", "a", "b", "c"], None) == ["b", "a", "c"]
