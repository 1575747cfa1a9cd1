"""Paper-layout tables (markdown and LaTeX) from the results of every run, and the report that holds them.

Tables put datasets in rows, plus an ``Average`` row, and methods in columns; a cell is ``mean ± std`` over
seeds (the average row averages over datasets within each seed first). The best mean of a row is bold (lowest
for ECE, highest otherwise). ``n/a`` marks numbers a method cannot produce: the linear probe is class-specific,
so it has no novel-class accuracy and no cross-dataset transfer. Rows marked with a dagger are two-class
datasets in the base-to-novel setting: base and novel hold one class each, so every method scores 100% there
(the published protocol, kept as is).

Methods and datasets appear under their display names (``biovlm.methods.DISPLAY_NAMES``,
``DatasetInfo.display_name``). A report made from synthetic twins (``write_report(synthetic=True)``) says so in
its header, in every table's caption and in every figure. The LaTeX tables need ``booktabs`` and ``graphicx``:
each is shrunk to the line width when wider (never enlarged), and one wider than a two-column layout's column
(``COLUMN_PT``, from its estimated natural width, ``latex_width_pt``) is a page-wide ``table*``.

Pure: reads a results DataFrame (``biovlm.evaluate.RESULT_COLUMNS``), writes files. The figures are drawn by
``biovlm.plots``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pandas as pd

from biovlm.evaluate import harmonic_mean, ordered
from biovlm.plots import (
    NA,
    SYNTHETIC_MARK,
    SYNTHETIC_NOTE,
    display_name,
    not_applicable_note,
    plot_base2new,
    plot_crossdata,
    plot_fewshot,
)

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
    italic_cells: list[tuple[str, str]] = field(default_factory=list)  # (row, column): the in-domain cells
    row_title: str = "Dataset"
    bold: bool = True
    synthetic: bool = False  # made from synthetic twins: the caption and a note say so
    rotate_headers: bool = False  # LaTeX: column titles turned upright (the dataset x dataset matrices)

    @property
    def title(self) -> str:
        return f"{SYNTHETIC_MARK}: {self.caption}" if self.synthetic else self.caption

    @property
    def all_notes(self) -> list[str]:
        return self.notes + ([SYNTHETIC_NOTE] if self.synthetic else [])


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


def _nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(mean: float, std: float | None, bold: bool, italic: bool = False) -> str:
    """A Markdown cell: ``mean ± std`` (a NaN std as 0.0, no std: the mean alone), ``n/a`` for no mean."""
    if _nan(mean):
        return NA
    text = f"{mean:.1f}" if std is None else f"{mean:.1f} ± {0.0 if _nan(std) else std:.1f}"
    return f"**{text}**" if bold else f"*{text}*" if italic else text


def _tex_cell(mean: float, std: float | None, bold: bool, italic: bool = False) -> str:
    r"""A LaTeX cell: the mean, then the std as a subscript (narrower than ``mean $\pm$ std``)."""
    if _nan(mean):
        return NA
    text = rf"\textbf{{{mean:.1f}}}" if bold else rf"\textit{{{mean:.1f}}}" if italic else f"{mean:.1f}"
    return text if std is None else text + rf"$_{{\pm {0.0 if _nan(std) else std:.1f}}}$"


def _std(table: Table, label: str, method: str) -> float | None:
    return None if table.std is None else table.std.at[label, method]


def _best(row: pd.Series, higher: bool) -> set:
    row = row.dropna().round(1)  # a row of n/a only: max() is NaN, which equals nothing, so nothing is bold
    target = row.max() if higher else row.min()
    return set(row.index[row == target])


def _rows(table: Table):
    """(row label, [(mean, std, bold, italic) per column]) for every row of the table."""
    for label in table.mean.index:
        best = _best(table.mean.loc[label], table.higher_is_better) if table.bold else set()
        yield label, [(table.mean.at[label, c], _std(table, label, c), c in best, (label, c) in table.italic_cells)
                      for c in table.mean.columns]


def to_markdown(table: Table) -> str:
    columns = [display_name(c) for c in table.mean.columns]
    lines = [f"**{table.title}**", "", f"| {table.row_title} | " + " | ".join(columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for label, cells in _rows(table):
        shown = "**Average**" if label == "Average" else display_name(label)
        if label in table.marked_rows:
            shown += f" {TRIVIAL_MARK}"
        lines.append(f"| {shown} | " + " | ".join(_fmt(*cell) for cell in cells) + " |")
    lines += [""] + [f"{note}  " for note in table.all_notes]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------- LaTeX
SMALL_PT = 9.0  # \small in a 10 pt document: the tables' text
SCRIPT_PT = 6.0  # a subscript of \small text: the std
TABCOLSEP_PT = 6.0  # LaTeX's default space on each side of a column
COLUMN_PT = 240.0  # a column of a two-column layout (IEEE 252 pt, CVPR 237 pt); wider tables span the page
BOLD_WIDTH = 1.15  # \textbf (cmbx) is about 15% wider than cmr


@cache
def _cm_font():
    import matplotlib
    from matplotlib import ft2font

    font = ft2font.FT2Font(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "cmr10.ttf"))
    font.set_size(1, 72)  # advances in points per point of font size
    return font


def text_width_pt(text: str, size: float = SMALL_PT, bold: bool = False) -> float:
    """Estimated width of ``text`` typeset in Computer Modern at ``size`` pt: the glyph advances of matplotlib's
    cmr10 (TeX's own font metrics: digits 0.5 em, "." 0.278 em), a space as TeX's interword space (1/3 em), "±"
    as 0.778 em (cmsy) and "†" as 0.444 em."""
    from matplotlib import ft2font

    font, em = _cm_font(), 0.0
    for char in text:
        if char in " ±†":
            em += {" ": 1 / 3, "±": 0.778, "†": 0.444}[char]
        else:
            em += font.load_char(ord(char), flags=ft2font.LoadFlags.NO_HINTING).linearHoriAdvance / 65536
    return em * size * (BOLD_WIDTH if bold else 1.0)


def _header_lines(name: str) -> list[str]:
    """A column title in at most two lines: split at the space nearest its middle ("Linear" / "probe")."""
    spaces = [i for i, char in enumerate(name) if char == " "]
    if not spaces:
        return [name]
    cut = min(spaces, key=lambda i: abs(i - len(name) / 2))
    return [name[:cut], name[cut + 1:]]


def _cell_width(mean: float, std: float | None, bold: bool, italic: bool = False) -> float:
    if _nan(mean):
        return text_width_pt(NA)
    width = text_width_pt(f"{mean:.1f}", bold=bold)
    return width if std is None else width + text_width_pt(f"±{0.0 if _nan(std) else std:.1f}", SCRIPT_PT)


def latex_width_pt(table: Table) -> float:
    """Estimated natural width of the table's tabular (before any shrinking), in points: the widest entry of each
    column (title or cell) plus the column separation."""
    rows = list(_rows(table))
    first = [text_width_pt(table.row_title)] + [
        text_width_pt(display_name(label), bold=False) + text_width_pt("†", SCRIPT_PT) * (label in table.marked_rows)
        for label, _ in rows]
    widths = [max(first)]
    for j, column in enumerate(table.mean.columns):
        title = SMALL_PT if table.rotate_headers else max(map(text_width_pt, _header_lines(display_name(column))))
        widths.append(max([title] + [_cell_width(*cells[j]) for _, cells in rows]))
    return sum(widths) + 2 * TABCOLSEP_PT * len(widths)


def _tex_escape(text: str) -> str:
    return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")


def _tex_header(name: str, rotate: bool) -> str:
    if rotate:
        return rf"\rotatebox{{90}}{{{_tex_escape(name)}}}"
    lines = [_tex_escape(line) for line in _header_lines(name)]
    return lines[0] if len(lines) == 1 else r"\begin{tabular}[b]{@{}c@{}}" + r"\\".join(lines) + r"\end{tabular}"


def to_latex(table: Table) -> str:
    """A booktabs ``table`` (``table*`` when wider than ``COLUMN_PT``), shrunk to the line width when wider than
    it (needs ``\\usepackage{booktabs,graphicx}``)."""
    width = latex_width_pt(table)
    env = "table" if width <= COLUMN_PT else "table*"
    titles = [_tex_header(display_name(c), table.rotate_headers) for c in table.mean.columns]
    lines = [f"% {table.name}: natural width about {width:.0f} pt (estimated, Computer Modern at \\small); "
             + ("fits a column" if env == "table" else "spans the page (table*)")
             + "; shrunk to \\linewidth if wider",
             rf"\begin{{{env}}}[t]", r"\centering", r"\small",
             rf"\caption{{{_tex_escape(table.title)}}}", rf"\label{{tab:{table.name}}}",
             r"\resizebox{\ifdim\width>\linewidth\linewidth\else\width\fi}{!}{%",
             r"\begin{tabular}{l" + "c" * len(titles) + "}", r"\toprule",
             _tex_escape(table.row_title) + " & " + " & ".join(titles) + r" \\",
             r"\midrule"]
    for label, cells in _rows(table):
        if label == "Average":
            lines.append(r"\midrule")
        shown = _tex_escape(display_name(label)) + (r"$^\dagger$" if label in table.marked_rows else "")
        lines.append(shown + " & " + " & ".join(_tex_cell(*cell) for cell in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}}"]
    if table.all_notes:
        notes = " ".join(_tex_escape(n).replace(TRIVIAL_MARK, r"$^\dagger$") for n in table.all_notes)
        lines.append(rf"\par\footnotesize {notes}")
    lines.append(rf"\end{{{env}}}")
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
        tables.append(table)
    # n/a: a method with base but no novel numbers cannot classify unseen classes; one without any did not run
    has_base, has_novel = (t.mean.drop(index="Average").notna().any() for t in tables[:2])
    cannot = [m for m in methods if has_base[m] and not has_novel[m]]
    unrun = [m for m in methods if not has_base[m]]
    for table in tables:
        if cannot and table is not tables[0]:
            table.notes.append(not_applicable_note(cannot, "classes it was not trained on"))
        if unrun:
            table.notes.append(f"{NA}: no base-to-novel results for {', '.join(map(display_name, unrun))}.")
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
        summary.notes.append(not_applicable_note(absent, "another dataset's classes"))
    tables = [summary]
    for method in ordered(rows.method, methods):
        mine = rows[rows.method == method]
        targets = ordered(mine.target, datasets)
        values = pd.DataFrame({"row": mine.source, "method": mine.target, "seed": mine.seed,
                               "value": mine.accuracy})
        table = pivot_table(values, ordered(mine.source, datasets), targets, f"crossdata_matrix_{method}",
                            f"Cross-dataset accuracy (%) of {display_name(method)}: rows are sources, columns "
                            f"targets (in italics: in-domain, the source's own test set)")
        table.mean = table.mean.drop(index="Average")
        table.std = table.std.drop(index="Average")
        table.row_title, table.bold, table.rotate_headers = "Source / target", False, True
        table.italic_cells = [(d, d) for d in table.mean.index if d in table.mean.columns]
        tables.append(table)
    return tables


# ---------------------------------------------------------------------------------------------- the report
def write_report(df: pd.DataFrame, out: str | Path, methods: Sequence[str] | None = None,
                 datasets: Sequence[str] | None = None, header: str = "", synthetic: bool = False) -> list[Path]:
    """Write ``report.md`` (every table, figures inline), ``tables.tex`` and ``figures/*.png`` under ``out``;
    ``synthetic``: the results come from synthetic twins, and every table and figure says so."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    methods = ordered(df.method, methods)
    datasets = ordered(list(df.target) + list(df.source), datasets)
    sections = [("Few-shot", fewshot_tables(df, methods, datasets)),
                ("Base-to-novel", base2new_tables(df, methods, datasets)),
                ("Cross-dataset", crossdata_tables(df, methods, datasets))]
    figures = {"Few-shot": plot_fewshot(df, methods, datasets, out / "figures", synthetic),
               "Base-to-novel": plot_base2new(df, methods, out / "figures", synthetic),
               "Cross-dataset": plot_crossdata(df, methods, datasets, out / "figures", synthetic)}
    md = ["# biovlm benchmark report", ""]
    if synthetic:
        md += [f"> **{SYNTHETIC_NOTE}**", ""]
    if header:
        md += [header, ""]
    md += ["Cells are mean ± std over seeds, in percent; the best mean of each row is bold.", "", PROTOCOL_NOTES, ""]
    tex = ["% biovlm benchmark tables (generated by `dvc repro report`); needs \\usepackage{booktabs,graphicx}", ""]
    if synthetic:
        tex[0] += f"\n% {SYNTHETIC_NOTE}"
    for title, tables in sections:
        if not tables:
            continue
        md += [f"## {title}", ""]
        for fig in figures[title]:
            md += [f"![{fig.stem}](figures/{fig.name})", ""]
        for table in tables:
            table.synthetic = synthetic
            md += [to_markdown(table), ""]
            tex += [to_latex(table), ""]
    paths = [out / "report.md", out / "tables.tex"]
    paths[0].write_text("\n".join(md).rstrip() + "\n")
    paths[1].write_text("\n".join(tex).rstrip() + "\n")
    return paths + [p for f in figures.values() for p in f]
