"""Paper-layout tables (markdown and LaTeX) from the results of every run, and the report that holds them.

Tables put datasets in rows, plus an ``Average`` row, and methods in columns; a cell is ``mean ± std`` over
seeds (the average row averages over datasets within each seed first). The best mean of a row is bold (lowest
for ECE, highest otherwise). ``n/a`` marks numbers a method cannot produce: the linear probe is class-specific,
so it has no novel-class accuracy and no cross-dataset transfer. Rows marked with a dagger are two-class
datasets in the base-to-novel setting: base and novel hold one class each, so every method scores 100% there
(the published protocol, kept as is).

Pure: reads a results DataFrame (``biovlm.evaluate.RESULT_COLUMNS``), writes files. The figures are drawn by
``biovlm.plots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from biovlm.evaluate import harmonic_mean, ordered

NA = "n/a"
METRIC_NAMES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "auc": "one-vs-rest AUC", "ece": "ECE (15 bins)"}
TRIVIAL_MARK = "†"
PROTOCOL_NOTES = (
    "Protocol (docs/protocol.md): each run sees only its own K shots and min(K, 4) validation shots per training "
    "class; its attributes are the filter.keep best of each training class scored on those shots against its own "
    "training classes (every attribute for classes without shots; the zero-shot attribute ensemble uses every "
    "attribute); view tuples are keyed by image, so a seed's result does not depend on the other seeds; the linear "
    "probe's C is chosen on the run's validation shots (CoOp's grid + bisection); the base-to-novel HM is "
    "HM(mean base, mean novel), as CoCoOp, BiomedCoOp and BioVLM report it.")


@dataclass
class Table:
    """One table: ``mean``/``std`` frames indexed by row label (datasets + "Average"), columns = methods; ``std`` is
    None for numbers computed from means (the harmonic mean): no spread over seeds, cells show the mean alone."""

    name: str
    caption: str
    mean: pd.DataFrame
    std: pd.DataFrame | None
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)
    marked_rows: list[str] = field(default_factory=list)
    row_title: str = "Dataset"
    bold: bool = True


def pivot_table(values: pd.DataFrame, rows: Sequence[str], methods: Sequence[str], name: str, caption: str,
                higher_is_better: bool = True) -> Table:
    """``values`` has columns (row, method, seed, value): one number per seed. Adds the Average row."""
    values = values[values.value.notna()]
    grouped = values.groupby(["row", "method"])["value"]
    mean = grouped.mean().unstack("method").reindex(index=list(rows), columns=list(methods))
    std = grouped.std(ddof=0).unstack("method").reindex(index=list(rows), columns=list(methods))
    # Average row: only where a method has every row (an average over a subset would not be comparable)
    complete = values.groupby("method")["row"].nunique() == len(rows)
    per_seed = values[values.method.isin(complete[complete].index)].groupby(["method", "seed"])["value"].mean()
    avg = per_seed.groupby("method")
    mean.loc["Average"] = avg.mean()  # aligned on the method columns; NaN for methods without an average
    std.loc["Average"] = avg.std(ddof=0)
    return Table(name, caption, mean, std, higher_is_better)


def _fmt(mean: float, std: float | None, bold: bool, latex: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "--" if latex else NA
    pm = r" $\pm$ " if latex else " ± "
    text = f"{mean:.1f}" if std is None else f"{mean:.1f}{pm}{0.0 if math.isnan(std) else std:.1f}"
    if bold:
        return rf"\textbf{{{text}}}" if latex else f"**{text}**"
    return text


def _std(table: Table, label: str, method: str) -> float | None:
    return None if table.std is None else table.std.at[label, method]


def _best(row: pd.Series, higher: bool) -> set:
    row = row.dropna().round(1)  # a row of n/a only: max() is NaN, which equals nothing, so nothing is bold
    target = row.max() if higher else row.min()
    return set(row.index[row == target])


def to_markdown(table: Table) -> str:
    methods = list(table.mean.columns)
    lines = [f"**{table.caption}**", "", f"| {table.row_title} | " + " | ".join(methods) + " |",
             "|---|" + "---:|" * len(methods)]
    for label in table.mean.index:
        best = _best(table.mean.loc[label], table.higher_is_better) if table.bold else set()
        cells = [_fmt(table.mean.at[label, m], _std(table, label, m), m in best) for m in methods]
        shown = f"**{label}**" if label == "Average" else label
        if label in table.marked_rows:
            shown += f" {TRIVIAL_MARK}"
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    lines += [""] + [f"{note}  " for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def _tex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment (needs ``\\usepackage{booktabs}``)."""
    methods = list(table.mean.columns)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(table.caption)}}}", rf"\label{{tab:{table.name}}}",
             r"\begin{tabular}{l" + "c" * len(methods) + "}", r"\toprule",
             _tex_escape(table.row_title) + " & " + " & ".join(_tex_escape(m) for m in methods) + r" \\",
             r"\midrule"]
    for label in table.mean.index:
        if label == "Average":
            lines.append(r"\midrule")
        best = _best(table.mean.loc[label], table.higher_is_better) if table.bold else set()
        cells = [_fmt(table.mean.at[label, m], _std(table, label, m), m in best, latex=True) for m in methods]
        shown = _tex_escape(label) + (r"$^\dagger$" if label in table.marked_rows else "")
        lines.append(shown + " & " + " & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if table.notes:
        notes = " ".join(_tex_escape(n).replace(TRIVIAL_MARK, r"$^\dagger$") for n in table.notes)
        lines.append(rf"\par\footnotesize {notes}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- the tables
def _values(rows: pd.DataFrame, metric: str, row_col: str = "target") -> pd.DataFrame:
    return pd.DataFrame({"row": rows[row_col], "method": rows["method"], "seed": rows["seed"],
                         "value": rows[metric]})


def fewshot_tables(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str]) -> list[Table]:
    """Accuracy at every K, and macro-F1, AUC and ECE at the largest K."""
    rows = df[(df.setting == "fewshot") & (df.part == "all")]
    if rows.empty:
        return []
    shots = sorted(rows.shots.unique())
    tables = []
    for k in shots:
        at_k = rows[rows.shots == k]
        tables.append(pivot_table(_values(at_k, "accuracy"), datasets, methods, f"fewshot_k{k}_accuracy",
                                  f"Few-shot accuracy (%), K = {k} (shots per class)"))
    top = rows[rows.shots == shots[-1]]
    for metric in ("macro_f1", "auc", "ece"):
        tables.append(pivot_table(_values(top, metric), datasets, methods, f"fewshot_k{shots[-1]}_{metric}",
                                  f"Few-shot {METRIC_NAMES[metric]} (%), K = {shots[-1]}",
                                  higher_is_better=metric != "ece"))
    return tables


def base2new_tables(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str]) -> list[Table]:
    rows = df[df.setting == "base2new"]
    if rows.empty:
        return []
    shots = int(rows.shots.max())
    pivot = rows.pivot_table(index=["method", "target", "seed"], columns="part", values="accuracy")
    pivot = pivot.reindex(columns=["base", "novel"]).reset_index()
    trivial = sorted(set(rows.loc[(rows.part == "base") & (rows.n_classes == 1), "target"]))
    tables = []
    for part, title in (("base", "base classes"), ("novel", "novel classes"), ("hm", "harmonic mean")):
        caption = f"Base-to-novel accuracy (%), {title}, {shots} shots per base class"
        if part == "hm":  # the published HM: of the mean base and mean novel cells above, the average row too
            base, novel = tables[0], tables[1]
            hm = pd.DataFrame(harmonic_mean(base.mean.to_numpy(), novel.mean.to_numpy()),
                              index=base.mean.index, columns=base.mean.columns)
            table = Table(f"base2new_{part}", caption + " (HM of the mean base and novel accuracies)", hm,
                          None)
        else:
            values = pd.DataFrame({"row": pivot.target, "method": pivot.method, "seed": pivot.seed,
                                   "value": pivot[part]})
            table = pivot_table(values, datasets, methods, f"base2new_{part}", caption)
        table.marked_rows = [d for d in trivial if d in table.mean.index]
        if table.marked_rows:
            table.notes.append(f"{TRIVIAL_MARK} two classes: base and novel hold one class each, so accuracy is "
                               "trivially 100%.")
        if part != "base" and table.mean.drop(index="Average").isna().all().any():
            table.notes.append(f"{NA}: the method cannot classify classes it was not trained on.")
        tables.append(table)
    return tables


def crossdata_tables(df: pd.DataFrame, methods: Sequence[str], datasets: Sequence[str]) -> list[Table]:
    """Per source: mean accuracy over the other datasets; then one source x target matrix per method."""
    rows = df[(df.setting == "crossdata") & (df.part == "all")]
    if rows.empty:
        return []
    shots = int(rows.shots.max())
    off = rows[rows.source != rows.target]
    per = off.groupby(["source", "method", "seed"])["accuracy"].mean().reset_index()
    values = pd.DataFrame({"row": per.source, "method": per.method, "seed": per.seed, "value": per.accuracy})
    sources = ordered(rows.source, datasets)
    summary = pivot_table(values, sources, methods, "crossdata_transfer",
                          f"Cross-dataset accuracy (%): trained on the row's dataset ({shots} shots), mean over "
                          f"the other datasets")
    absent = [m for m in methods if m not in set(rows.method)]
    if absent:
        summary.notes.append(f"{NA}: {', '.join(absent)} cannot classify another dataset's classes.")
    tables = [summary]
    for method in ordered(rows.method, methods):
        mine = rows[rows.method == method]
        targets = ordered(mine.target, datasets)
        values = pd.DataFrame({"row": mine.source, "method": mine.target, "seed": mine.seed,
                               "value": mine.accuracy})
        table = pivot_table(values, ordered(mine.source, datasets), targets, f"crossdata_matrix_{method}",
                            f"Cross-dataset accuracy (%) of {method}: rows are sources, columns targets "
                            f"(diagonal: in-domain)")
        table.mean = table.mean.drop(index="Average")
        table.std = table.std.drop(index="Average")
        table.row_title, table.bold = "Source / target", False
        tables.append(table)
    return tables


# ---------------------------------------------------------------------------------------------- the report
def write_report(df: pd.DataFrame, out: str | Path, methods: Sequence[str] | None = None,
                 datasets: Sequence[str] | None = None, header: str = "") -> list[Path]:
    """Write ``report.md`` (every table, figures inline), ``tables.tex`` and ``figures/*.png`` under ``out``."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    methods = ordered(df.method, methods)
    datasets = ordered(list(df.target) + list(df.source), datasets)
    sections = [("Few-shot", fewshot_tables(df, methods, datasets)),
                ("Base-to-novel", base2new_tables(df, methods, datasets)),
                ("Cross-dataset", crossdata_tables(df, methods, datasets))]
    from biovlm.plots import plot_base2new, plot_crossdata, plot_fewshot

    figures = {"Few-shot": plot_fewshot(df, methods, datasets, out / "figures"),
               "Base-to-novel": plot_base2new(df, methods, out / "figures"),
               "Cross-dataset": plot_crossdata(df, methods, datasets, out / "figures")}
    md = ["# biovlm benchmark report", ""]
    if header:
        md += [header, ""]
    md += ["Cells are mean ± std over seeds, in percent; the best mean of each row is bold.", "", PROTOCOL_NOTES, ""]
    tex = ["% biovlm benchmark tables (generated by `dvc repro report`); needs \\usepackage{booktabs}", ""]
    for title, tables in sections:
        if not tables:
            continue
        md += [f"## {title}", ""]
        for fig in figures[title]:
            md += [f"![{fig.stem}](figures/{fig.name})", ""]
        for table in tables:
            md += [to_markdown(table), ""]
            tex += [to_latex(table), ""]
    paths = [out / "report.md", out / "tables.tex"]
    paths[0].write_text("\n".join(md).rstrip() + "\n")
    paths[1].write_text("\n".join(tex).rstrip() + "\n")
    return paths + [p for f in figures.values() for p in f]
