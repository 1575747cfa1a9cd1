"""The figures, read from the matplotlib Figure objects (titles, tick labels, cell texts, bars, notes), not pixels."""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402
from conftest import ROOT  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from biovlm.data import DATASETS, medmnist_info  # noqa: E402
from biovlm.evaluate import RESULT_COLUMNS  # noqa: E402
from biovlm.methods import DISPLAY_NAMES, METHOD_NAMES  # noqa: E402
from biovlm.plots import (  # noqa: E402
    DIAGONAL_NOTE,
    SYNTHETIC_MARK,
    SYNTHETIC_NOTE,
    base2new_figures,
    crossdata_figures,
    display_name,
    fewshot_figures,
)


def frame(rows) -> pd.DataFrame:
    """Rows (method, setting, source, target, shots, seed, part, accuracy) as a results table."""
    return pd.DataFrame([(m, st, src, tgt, k, s, part, 3, 50, float(a), 0.0, 0.0, 0.0)
                         for m, st, src, tgt, k, s, part, a in rows], columns=list(RESULT_COLUMNS))


def crossdata_rows() -> pd.DataFrame:
    """coop trained on pathmnist and bloodmnist (not on breastmnist or octmnist), tested on three datasets; seeds 1
    and 2 average to: pathmnist -> (breast 50, path 85, blood 35), bloodmnist -> (65, 25, 70). zeroshot: 10 less."""
    acc = {("pathmnist", "pathmnist"): (90, 80), ("pathmnist", "bloodmnist"): (30, 40),
           ("pathmnist", "breastmnist"): (50, 50), ("bloodmnist", "pathmnist"): (20, 30),
           ("bloodmnist", "bloodmnist"): (70, 70), ("bloodmnist", "breastmnist"): (64, 66)}
    return frame([(m, "crossdata", src, tgt, 16, s, "all", a[s - 1] - shift)
                  for m, shift in (("coop", 0), ("zeroshot", 10)) for (src, tgt), a in acc.items() for s in (1, 2)])


def base2new_rows() -> pd.DataFrame:
    """coop: base (breast, blood) seed 1 (80, 60), seed 2 (90, 70) -> 75 ± 5; novel (40, 50), (60, 50) -> 50 ± 5;
    HM(75, 50) = 60. linear_probe: base only, (90, 70), (90, 80) -> 82.5 ± 2.5."""
    acc = {("coop", "base"): {1: (80, 60), 2: (90, 70)}, ("coop", "novel"): {1: (40, 50), 2: (60, 50)},
           ("linear_probe", "base"): {1: (90, 70), 2: (90, 80)}}
    return frame([(m, "base2new", d, d, 16, s, part, per_seed[s][i])
                  for (m, part), per_seed in acc.items() for s in (1, 2)
                  for i, d in enumerate(("breastmnist", "bloodmnist"))])


def fewshot_rows() -> pd.DataFrame:
    return frame([(m, "fewshot", d, d, k, s, "all", 40.0 + k + s)
                  for m in ("coop", "zeroshot_attr") for d in ("pathmnist", "octmnist") for k in (1, 16)
                  for s in (1, 2)])


def footer(fig) -> str:
    return "\n".join(t.get_text() for t in fig.texts)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_display_names_come_from_the_method_and_dataset_registries():
    assert [display_name(n) for n in ("coop", "clip_adapter", "linear_probe", "zeroshot_attr")] == [
        "CoOp", "CLIP-Adapter", "Linear probe", "Zero-shot + attributes"]
    assert [display_name(n) for n in ("pathmnist", "octmnist", "organamnist")] == ["PathMNIST", "OCTMNIST",
                                                                                  "OrganAMNIST"]
    assert display_name("d1") == "d1" and display_name("Average") == "Average"  # unknown ids print as they are
    assert tuple(DISPLAY_NAMES) == METHOD_NAMES and len(set(DISPLAY_NAMES.values())) == len(METHOD_NAMES)
    for name, info in DATASETS.items():  # medmnist's own spelling of the dataset, the id in its case
        assert info.display_name == medmnist_info()[name]["python_class"] and info.display_name.lower() == name


def test_crossdata_heatmap_has_only_the_sources_that_ran_values_in_cells_and_the_in_domain_cells_outlined():
    figures = crossdata_figures(crossdata_rows(), ["zeroshot", "coop", "linear_probe"],
                                ["breastmnist", "pathmnist", "octmnist", "bloodmnist"])
    fig = figures["crossdata_heatmap.png"]
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["Zero-shot", "CoOp"]  # the linear probe has no panel
    for ax, shift in zip(panels, (10, 0), strict=True):
        # rows: the two sources that ran (octmnist and breastmnist were never trained on), in params order
        assert [t.get_text() for t in ax.get_yticklabels()] == ["PathMNIST", "BloodMNIST"]
        assert [t.get_text() for t in ax.get_xticklabels()] == ["BreastMNIST", "PathMNIST", "BloodMNIST"]
        cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
        expected = [[50, 85, 35], [65, 25, 70]]
        assert cells == {(i, j): str(v - shift) for i, row in enumerate(expected) for j, v in enumerate(row)}
        # in-domain: pathmnist's row at the PathMNIST column (1), bloodmnist's at the BloodMNIST column (2)
        boxes = [p for p in ax.patches if isinstance(p, Rectangle) and not p.get_fill()]
        assert sorted(p.get_xy() for p in boxes) == [(0.5, -0.5), (1.5, 0.5)]
    notes = footer(fig)
    assert DIAGONAL_NOTE in notes and "n/a: Linear probe cannot classify another dataset's classes." in notes
    assert crossdata_figures(crossdata_rows().assign(setting="fewshot"), ["coop"], ["pathmnist"]) == {}


def test_base2new_bars_with_error_bars_and_n_a_where_the_linear_probe_has_no_number():
    fig = base2new_figures(base2new_rows(), ["coop", "linear_probe"])["base2new.png"]
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["CoOp", "Linear probe"]
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, BarContainer)}
    heights = {label: [p.get_height() for p in c.patches] for label, c in bars.items()}
    assert heights["base"] == pytest.approx([75.0, 82.5]) and heights["novel"] == pytest.approx([50.0, 0.0])
    assert heights["harmonic mean"] == pytest.approx([60.0, 0.0])
    errors = {label: c.errorbar.lines[2][0].get_segments() for label, c in bars.items() if c.errorbar}
    assert [seg[1][1] - seg[0][1] for seg in errors["base"]] == pytest.approx([10.0, 5.0])  # 2 x std over seeds
    na = [t for t in ax.texts if t.get_text() == "n/a"]
    novel_x, hm_x = (bars[label].patches[1].get_x() + bars[label].patches[1].get_width() / 2
                     for label in ("novel", "harmonic mean"))
    assert sorted(t.get_position()[0] for t in na) == pytest.approx([novel_x, hm_x])
    assert "n/a: Linear probe cannot classify classes it was not trained on." in footer(fig)
    coop = base2new_rows().query("method == 'coop'")
    assert "n/a" not in footer(base2new_figures(coop, ["coop"])["base2new.png"])


def test_fewshot_figures_name_methods_and_datasets_by_display_name():
    figures = fewshot_figures(fewshot_rows(), ["zeroshot_attr", "coop"], ["octmnist", "pathmnist"])
    assert list(figures) == ["fewshot_average.png", "fewshot_per_dataset.png"]
    average, panels = figures.values()
    assert [t.get_text() for t in average.legends[0].get_texts()] == ["Zero-shot + attributes", "CoOp"]
    assert [ax.get_title() for ax in panels.axes[:2]] == ["OCTMNIST", "PathMNIST"]
    assert [t.get_text() for t in panels.legends[0].get_texts()] == ["Zero-shot + attributes", "CoOp"]


@pytest.mark.parametrize("synthetic", [True, False])
def test_every_figure_is_marked_synthetic_exactly_when_the_data_are(synthetic):
    figures = {**fewshot_figures(fewshot_rows(), ["coop"], ["pathmnist"], synthetic),
               **base2new_figures(base2new_rows(), ["coop"], synthetic),
               **crossdata_figures(crossdata_rows(), ["coop"], ["pathmnist"], synthetic)}
    assert len(figures) == 4
    for name, fig in figures.items():
        marks = [t for t in fig.texts if t.get_text() == SYNTHETIC_MARK]
        assert len(marks) == int(synthetic), name
        assert (SYNTHETIC_NOTE in footer(fig)) == synthetic, name
        assert all(not mark.get_in_layout() for mark in marks)  # the watermark does not push the axes around


# ---------------------------------------------------------------------------------------------- dvc plots
def dvc_plot(path: str, points: list[dict]) -> dict:
    """The Vega-Lite spec `dvc plots show` draws for the plot ``path`` of dvc.yaml, filled with ``points``."""
    from dvc_render.vega import VegaRenderer

    plots = {k: v for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"] for k, v in entry.items()}
    points = [{**p, "rev": "workspace"} for p in points]
    spec = VegaRenderer(points, path, template_dir=str(ROOT / ".dvc" / "plots"), **plots[path]).get_filled_template()
    assert "<DVC_METRIC" not in json.dumps(spec)  # every anchor the template uses was filled
    return spec


def test_dvc_fewshot_curve_draws_the_std_as_error_bars():
    spec = dvc_plot("metrics/plots/fewshot_curve.csv",
                    [{"method": "coop", "shots": "1", "accuracy": "50.0", "std": "2.5"},
                     {"method": "coop", "shots": "16", "accuracy": "70.0", "std": "1.0"}])
    assert spec["data"]["values"][0]["std"] == "2.5" and spec["data"]["format"]["parse"]["std"] == "number"
    layers = {layer["mark"]["type"]: layer for layer in spec["layer"]}
    assert set(layers) == {"line", "errorbar", "text"}
    assert spec["encoding"]["y"]["field"] == "accuracy" and layers["errorbar"]["encoding"]["yError"] == {"field": "std"}


def test_dvc_crossdata_heatmap_writes_values_in_cells_and_outlines_the_in_domain_cells():
    spec = dvc_plot("metrics/plots/crossdata.csv",
                    [{"method": "coop", "source": "pathmnist", "target": t, "accuracy": "60.0"}
                     for t in ("pathmnist", "bloodmnist")])
    layers = spec["spec"]["layer"]
    assert [layer["mark"]["type"] for layer in layers] == ["rect", "text", "rect", "text"]
    assert layers[1]["encoding"]["text"]["field"] == "accuracy"
    assert layers[2]["transform"] == [{"filter": "datum.target == datum.source"}]
    assert spec["facet"]["row"]["field"] == "method" and spec["facet"]["column"]["field"] == "rev"


@pytest.mark.parametrize("path", ["metrics/plots/fewshot_curve.csv", "metrics/plots/crossdata.csv"])
def test_dvc_plots_of_synthetic_twins_say_so(path):
    """The evaluate stage writes a `data` column; each template draws the marker from rows whose data is synthetic
    (one text, aggregated), and nothing from official data."""
    spec = dvc_plot(path, [{"method": "coop", "shots": "1", "accuracy": "50.0", "std": "1.0", "source": "pathmnist",
                            "target": "pathmnist", "data": "synthetic"}])
    layers = spec["layer"] if "layer" in spec else spec["spec"]["layer"]
    synthetic = "datum.data === 'synthetic'"
    [marker] = [layer for layer in layers if layer.get("transform", [{}])[0].get("filter") == synthetic]
    assert marker["mark"]["type"] == "text" and marker["encoding"]["text"]["value"].startswith("SYNTHETIC DATA")
    assert marker["transform"][1] == {"aggregate": [{"op": "count", "as": "n"}]}  # one marker, not one per point
