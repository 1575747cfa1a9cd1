"""`python -m biovlm.compare`: experiments side by side from `dvc exp show --json` (its layout as DVC 3 writes it)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from biovlm import compare


def _entry(rev: str, params: dict, metrics: dict | None = None, name: str | None = None,
           experiments: list[dict] | None = None) -> dict:
    """One entry of `dvc exp show --json`: a rev with its params.yaml and metrics/summary.json."""
    data = {"rev": rev, "timestamp": None, "params": {"params.yaml": {"data": params}},
            "metrics": {"metrics/summary.json": {"data": metrics}} if metrics is not None else {}, "deps": {},
            "outs": {}, "meta": {}}
    return {"rev": rev, "name": name, "data": data, "error": None,
            "experiments": [{"revs": [e]} for e in experiments] if experiments is not None else None}


DEMO = {"profile": "demo", "data": {"synthetic": True, "size": 28}, "biovlm": {"bank_size": 10, "l_kd": 1.0},
        "crossdata": {"sources": ["pathmnist", "dermamnist", "bloodmnist", "organamnist"]}, "coop": {"ctx_init": ""}}
PAPER = {"profile": "paper", "data": {"synthetic": False, "size": 224}, "biovlm": {"bank_size": 10, "l_kd": 1.0},
         "crossdata": {"sources": "all"}, "coop": {"ctx_init": "a photo of a"}}
SUMMARY = {"fewshot": {"coop": 90.04, "linear_probe": 96.09, "biovlm": 91.27},
           "base2new": {"coop": 86.14, "biovlm": 91.57}, "crossdata": {"coop": 89.58, "biovlm": 91.15}}


def _with(params: dict, **changes) -> dict:
    out = json.loads(json.dumps(params))
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        node = out
        for parent in parents:
            node = node[parent]
        node[key] = value
    return out


def exp_show_json() -> list[dict]:
    """A workspace (holding the last experiment's values), the baseline commit `main` (never run) and two demo
    experiments that differ in one BioVLM knob."""
    bank2 = _with(DEMO, biovlm__bank_size=2)
    summary2 = json.loads(json.dumps(SUMMARY))
    summary2["fewshot"]["biovlm"] = 90.77
    return [_entry("workspace", bank2, summary2),
            _entry("6959695e95a24519a966072adf1a0e3427f6d7e8", PAPER, name="main", experiments=[
                _entry("59c3168db1cba31a3cd974875201d664cca4801c", bank2, summary2, name="demo-bank2"),
                _entry("ec79618b3d9aeb559197218b1cb13bd2d12b9426", DEMO, SUMMARY, name="demo"),
            ])]


def test_reads_dvc_exp_show_json():
    exps = compare.experiments_from_json(exp_show_json())
    assert [(e.name, e.kind) for e in exps] == [("workspace", "workspace"), ("main", "commit"),
                                                 ("demo-bank2", "experiment"), ("demo", "experiment")]
    assert exps[2].params["biovlm.bank_size"] == 2 and exps[2].params["data.synthetic"] is True
    assert exps[2].params["crossdata.sources"] == ["pathmnist", "dermamnist", "bloodmnist", "organamnist"]
    assert exps[3].metrics["fewshot"]["biovlm"] == 91.27 and exps[1].metrics == {}
    unnamed = compare.experiments_from_json([_entry("6959695e95a2", PAPER)])
    assert unnamed[0].name == "6959695"  # a commit without a branch name: its short rev


def test_select_defaults_to_the_experiments_and_finds_names_and_revs():
    exps = compare.experiments_from_json(exp_show_json())
    assert [e.name for e in compare.select(exps, [])] == ["demo-bank2", "demo"]
    assert [e.name for e in compare.select(exps, ["main", "ec79618", "workspace"])] == ["main", "demo", "workspace"]
    only_commit = compare.experiments_from_json([_entry("workspace", PAPER), _entry("6959695e95a2", PAPER)])
    assert [e.name for e in compare.select(only_commit, [])] == ["workspace"]  # no experiment yet
    with pytest.raises(ValueError, match=r"no experiment named 'demo-k3'; known: workspace, main, demo-bank2, demo"):
        compare.select(exps, ["demo-k3"])
    with pytest.raises(ValueError, match="no experiment named 'ec7'"):
        compare.select(exps, ["ec7"])  # too short a prefix to mean a commit


def test_differing_knobs_lists_only_what_differs():
    exps = compare.experiments_from_json(exp_show_json())
    assert compare.differing_knobs(exps[2:]) == ["biovlm.bank_size"]
    assert compare.differing_knobs(exps[1:2] + exps[3:]) == ["profile", "data.synthetic", "data.size",
                                                              "crossdata.sources", "coop.ctx_init"]
    lacking = compare.Experiment("x", "x", "experiment", {"biovlm.bank_size": 10}, {})
    assert compare.differing_knobs([exps[3], lacking]) == ["profile", "data.synthetic", "data.size",
                                                            "biovlm.l_kd", "crossdata.sources", "coop.ctx_init"]


def test_table_two_experiments():
    exps = compare.select(compare.experiments_from_json(exp_show_json()), [])
    assert compare.table(exps) == """\
                             demo-bank2            demo
  data                   SYNTHETIC DATA  SYNTHETIC DATA
knobs that differ
  biovlm.bank_size                    2              10
few-shot, largest K (%)
  CoOp                             90.0            90.0
  Linear probe                     96.1            96.1
  BioVLM                           90.8            91.3
base-to-novel HM (%)
  CoOp                             86.1            86.1
  BioVLM                           91.6            91.6
cross-dataset (%)
  CoOp                             89.6            89.6
  BioVLM                           91.2            91.2"""


def test_table_marks_not_run_and_long_values():
    """main never ran (``-``), a long list is cut, an empty string is visible, real data is not marked synthetic."""
    exps = compare.experiments_from_json(exp_show_json())
    assert compare.table([exps[1], exps[3]]) == """\
                                 main                      demo
  data                      MedMNIST+            SYNTHETIC DATA
knobs that differ
  profile                       paper                      demo
  data.synthetic                false                      true
  data.size                       224                        28
  crossdata.sources               all  ["pathmnist", "dermamni…
  coop.ctx_init          a photo of a                        ""
few-shot, largest K (%)
  CoOp                              -                      90.0
  Linear probe                      -                      96.1
  BioVLM                            -                      91.3
base-to-novel HM (%)
  CoOp                              -                      86.1
  BioVLM                            -                      91.6
cross-dataset (%)
  CoOp                              -                      89.6
  BioVLM                            -                      91.2"""


def test_table_marks_a_method_without_a_number_not_applicable():
    exps = compare.experiments_from_json(exp_show_json())
    other = compare.Experiment("lp", "r", "experiment", dict(exps[3].params), {"base2new": {"linear_probe": 1.0}})
    lines = compare.table([exps[3], other]).splitlines()
    assert lines[2:4] == ["knobs: all the same", "few-shot, largest K (%)"]
    assert lines[4].split() == ["CoOp", "90.0", "n/a"]
    assert [line.split()[-2:] for line in lines[8:11]] == [["86.1", "n/a"], ["91.6", "n/a"], ["n/a", "1.0"]]
    assert lines[10].startswith("  Linear probe ")


def test_table_one_experiment_names_its_profile():
    exps = compare.experiments_from_json(exp_show_json())
    lines = compare.table([exps[3]]).splitlines()
    assert lines[2].split() == ["profile", "(7", "knobs", "in", "params.yaml)", "demo"]
    assert "knobs that differ" not in lines
    empty = compare.table([exps[1]])
    assert empty.splitlines()[-1] == "no headline numbers yet (run `dvc exp run -S profile=demo`)"


def test_main_prints_the_table_and_fails_in_one_line(tmp_path, capsys, monkeypatch):
    saved = tmp_path / "exps.json"
    saved.write_text(json.dumps(exp_show_json()))
    compare.main(["--from-json", str(saved), "demo", "demo-bank2"])
    assert capsys.readouterr().out.splitlines()[3].split() == ["biovlm.bank_size", "10", "2"]
    with pytest.raises(SystemExit, match=r"^compare: no experiment named 'nope'; known: workspace, main, "):
        compare.main(["--from-json", str(saved), "nope"])

    calls = []

    def fake_run(returncode: int, stdout: str = "", stderr: str = ""):
        def run(*args, **kwargs):
            calls.append((args, kwargs))
            return SimpleNamespace(returncode=returncode, stdout=stdout, stderr=stderr)
        return run

    not_a_repo = "ERROR: you are not inside of a DVC repository (checked up to mount point '/')\n"
    monkeypatch.setattr(subprocess, "run", fake_run(251, stderr=not_a_repo))
    with pytest.raises(SystemExit, match=r"^compare: `dvc exp show --json` failed in \S+: ERROR: you are not inside of "
                                         r"a DVC repository"):
        compare.main(["--repo", str(tmp_path)])
    assert calls == [((["dvc", "exp", "show", "--json"],), {"cwd": tmp_path, "capture_output": True, "text": True})]
    monkeypatch.setattr(subprocess, "run", fake_run(1))
    with pytest.raises(SystemExit) as failed:
        compare.main([])
    assert failed.value.code == "compare: `dvc exp show --json` failed in .: (no message)"
    assert calls[-1][1]["cwd"] == Path(".")  # the current folder by default

    def missing(*args, **kwargs):
        raise FileNotFoundError("dvc")

    monkeypatch.setattr(subprocess, "run", missing)
    with pytest.raises(SystemExit) as failed:
        compare.main([])
    assert failed.value.code == ("compare: dvc is not installed in this environment; install the project (see the "
                                 "README)")
    monkeypatch.setattr(subprocess, "run", fake_run(0, stdout=json.dumps(exp_show_json())))
    compare.main(["--repo", str(tmp_path), "demo"])
    assert capsys.readouterr().out.splitlines()[0].split() == ["demo"]


def test_help_names_the_command_and_explains_every_option(capsys):
    with pytest.raises(SystemExit) as done:
        compare.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith("usage: python -m biovlm.compare [-h] [--repo REPO] [--from-json FILE] [EXPERIMENT ...] "
                           "`dvc exp show` prints one column per key of `params.yaml` and per dependency of every "
                           "stage"), text
    assert ("`metrics/summary.json`: setting x method). It reads `dvc exp show --json`, so it shows exactly what DVC "
            "recorded. positional arguments:") in text
    assert ("EXPERIMENT experiment names or commit prefixes, as `dvc exp show` lists them (default: every experiment "
            "of the current commit; `workspace` and the branch name work too)") in text
    assert "--repo REPO the project's git clone (default: the current folder)" in text
    assert "--from-json FILE read a saved `dvc exp show --json` output instead of running DVC" in text


def test_a_commit_prefix_of_four_characters_is_enough():
    exps = compare.experiments_from_json(exp_show_json())
    assert [e.name for e in compare.select(exps, ["ec79"])] == ["demo"]


def test_values_cut_only_beyond_the_width():
    exact = "x" * compare.MAX_VALUE_WIDTH
    assert compare._text(exact) == exact
    assert compare._text(exact + "y") == "x" * (compare.MAX_VALUE_WIDTH - 1) + "…"
    assert compare._text(None) == "null" and compare._text([1, 2]) == "[1, 2]"


def test_a_null_value_differs_from_a_missing_key():
    a = compare.Experiment("a", "a", "experiment", {"k": None, "same": 1}, {})
    b = compare.Experiment("b", "b", "experiment", {"same": 1}, {})
    assert compare.differing_knobs([a, b]) == ["k"]
    lines = compare.table([a, b]).splitlines()
    assert lines[3].split() == ["k", "null", "-"]  # a key one experiment lacks shows as -


def test_table_with_chosen_knobs_and_partial_settings():
    exps = compare.experiments_from_json(exp_show_json())
    lines = compare.table(exps[2:], knobs=["profile", "biovlm.l_kd"]).splitlines()
    assert [line.split() for line in lines[3:5]] == [["profile", "demo", "demo"], ["biovlm.l_kd", "1.0", "1.0"]]
    only_cross = compare.Experiment("x", "x", "experiment", {}, {"crossdata": {"coop": 50.0}})
    lines = compare.table([only_cross]).splitlines()
    assert lines[2].split() == ["profile", "(0", "knobs", "in", "params.yaml)", "-"]
    assert lines[3] == "cross-dataset (%)" and lines[4].split() == ["CoOp", "50.0"] and len(lines) == 5


def test_the_docs_example_is_this_table():
    """docs/experiments.md shows the start of the two-experiment table above (then ``...``): it must stay true."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    example = docs.split("```text\n", 1)[1].split("\n  ...\n```", 1)[0]
    table = compare.table(compare.select(compare.experiments_from_json(exp_show_json()), []))
    assert table.startswith(example + "\n"), example
