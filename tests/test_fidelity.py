"""docs/fidelity.md: the published value of every setting against what params.yaml runs, kept true by regenerating."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
from conftest import COMMITTED_PARAMS, ROOT, committed_file

from biovlm.config import METHOD_KNOBS, load_config


@pytest.fixture(scope="module")
def fidelity():
    spec = importlib.util.spec_from_file_location("bench_fidelity", ROOT / "bench" / "fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def test_every_published_value_is_run_or_its_difference_explained(fidelity):
    assert fidelity.check(load_config(COMMITTED_PARAMS)) == []


def test_the_committed_table_is_what_params_yaml_gives(fidelity):
    assert committed_file("docs/fidelity.md") == fidelity.render(COMMITTED_PARAMS), \
        "docs/fidelity.md is stale: run python bench/fidelity.py"


@pytest.mark.parametrize(("override", "setting"), [
    ({"biovlm.l_kd": 0.25}, "biovlm: KL(plain teacher) weight"),
    ({"biovlm.kl_reduction": "batchmean"}, "biovlm: KL scaling"),
    ({"filter.keep": 5}, "all: attributes per class used"),
    ({"features.views": 16}, "all: augmentation"),
    ({"biomedcoop.per_run.fewshot.dermamnist.kdsp_lambda": 1.0}, "biomedcoop: KDSP weight (DermaMNIST)"),
    ({"kgcoop.per_run.base2new.all.weight": 1.0}, "kgcoop: weight W (base-to-novel)"),
    ({"cocoop.train.batch_size": 4}, "cocoop: batch size"),
    ({"data.template": "a {modality} of {}."}, "all: hand template"),
])
def test_a_changed_default_is_caught(fidelity, override, setting):
    problems = fidelity.check(load_config(COMMITTED_PARAMS, override))
    assert len(problems) == 1 and problems[0].startswith(setting), problems
    assert problems[0].endswith("and no reason")


def test_a_stale_reason_is_caught(fidelity):
    problems = fidelity.check(load_config(COMMITTED_PARAMS, {"features.normalize": "backbone"}))
    assert any(p.startswith("coop: image normalisation") and p.endswith("drop the stale reason") for p in problems)
    assert any(p.startswith("all: image normalisation") and p.endswith("and no reason") for p in problems)


def test_every_biovlm_knob_and_baseline_weight_has_a_row(fidelity):
    keys = {row.key for row in fidelity.ROWS if isinstance(row.key, str)}
    assert {f"biovlm.{k}" for k in METHOD_KNOBS["biovlm"]} <= keys
    for method in ("coop", "cocoop", "kgcoop", "biomedcoop", "clip_adapter"):
        settings = {row.setting.split(" (")[0] for row in fidelity.ROWS if row.method == method}
        assert {"epochs", "batch size", "learning rate"} <= settings, method
        assert "context init" in settings or method == "clip_adapter", method


def test_each_changed_behaviour_names_a_test_that_exists(fidelity):
    tests = "".join(p.read_text() for p in (ROOT / "tests").glob("test_*.py"))
    for _, _, name in fidelity.FIXES:
        assert re.search(rf"^def {name}\(", tests, re.M), name


def test_the_demo_and_project_sections_list_what_their_profiles_change():
    text = Path(ROOT / "docs" / "fidelity.md").read_text()
    demo = load_config(COMMITTED_PARAMS, {"profile": "demo"})
    for key in demo["_from_profile"]:
        assert f"| `{key}` |" in text.split("## The demo profile")[1].split("## Project variant")[0]
    project = load_config(COMMITTED_PARAMS, {"profile": "project"})
    assert {"biovlm.l_kd", "biovlm.kl_reduction", "filter.keep"} <= set(project["_from_profile"])
