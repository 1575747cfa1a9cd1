"""conf/ composed into params.yaml, profiles, and validation: every bad value fails fast with a message naming key
and fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import COMMITTED_PARAMS

from biovlm.config import (
    METHOD_KNOBS,
    METHODS,
    PARAMS_HEADER,
    ConfigError,
    all_shots,
    compose,
    compose_text,
    crossdata_sources,
    load_config,
    raw_dir,
    validate,
)
from biovlm.data import DATASETS

ROOT = Path(__file__).resolve().parents[1]
PARAMS = COMMITTED_PARAMS


def raw() -> dict:
    return yaml.safe_load(PARAMS.read_text())


def checked(values: dict) -> dict:
    """``values`` validated as a composed params.yaml would be."""
    cfg = {**values, "_profile": values.get("profile", "paper"), "_from_profile": []}
    validate(cfg)
    return cfg


def config(**overrides) -> dict:
    return load_config(PARAMS, {k.replace("__", "."): v for k, v in overrides.items()})


def test_paper_defaults():
    cfg = config()
    assert cfg["_profile"] == "paper" and cfg["_from_profile"] == []
    assert cfg["datasets"] == list(DATASETS) and len(cfg["datasets"]) == 11
    assert cfg["methods"] == list(METHODS)
    assert cfg["backbone"]["name"] == "biomedclip" and cfg["data"]["size"] == 224 and not cfg["data"]["synthetic"]
    assert cfg["seeds"] == [1, 2, 3] and cfg["fewshot"]["shots"] == [1, 2, 4, 8, 16]
    assert cfg["train"]["epochs"] == 50 and cfg["train"]["lr"] == 0.002
    assert cfg["biovlm"]["bank_size"] == 10 and cfg["biovlm"]["select_ratio"] == 0.5
    assert all_shots(cfg) == [1, 2, 4, 8, 16] and crossdata_sources(cfg) == list(DATASETS)


def test_demo_overlay_changes_values_and_keeps_the_rest():
    paper, demo = config(), config(profile="demo")
    assert demo["data"]["synthetic"] is True and demo["data"]["size"] == 28
    assert demo["backbone"]["name"] == "tiny-pretrained"
    assert 16 in demo["fewshot"]["shots"] and demo["train"]["epochs"] < paper["train"]["epochs"]
    # untouched keys of a touched section survive the merge
    assert demo["train"]["momentum"] == paper["train"]["momentum"]
    assert demo["data"]["root"] == paper["data"]["root"]
    assert demo["datasets"] == paper["datasets"] and demo["methods"] == paper["methods"]
    assert "data.synthetic" in demo["_from_profile"] and "train.momentum" not in demo["_from_profile"]
    # the demo's only method knobs: the baselines' schedules and a random context where the published "a photo
    # of a" does not fit the tiny tokenizer; BioVLM's knobs mean the same under every profile
    knobs = {k for k in demo["_from_profile"] if k.split(".")[0] in METHOD_KNOBS
             and k.split(".")[1] not in ("train", "per_run")}
    assert knobs == {"coop.ctx_init", "cocoop.ctx_init", "kgcoop.ctx_init", "biomedcoop.ctx_init"}
    assert not any(k.startswith("biovlm.") for k in demo["_from_profile"])
    assert raw_dir(demo, "pathmnist") == Path("data/raw/pathmnist/synthetic")
    assert raw_dir(paper, "pathmnist") == Path("data/raw/pathmnist")


def test_per_run_values_apply_to_their_setting_and_dataset_only():
    from biovlm.config import method_config

    cfg = config()
    few = method_config(cfg, "biomedcoop", "fewshot", "dermamnist")
    assert (few["biomedcoop"]["sccm_lambda"], few["biomedcoop"]["kdsp_lambda"], few["train"]["epochs"]) == (5.0, 20.0,
                                                                                                          100)
    other = method_config(cfg, "biomedcoop", "fewshot", "pathmnist")  # no published config: train.py's defaults
    assert (other["biomedcoop"]["sccm_lambda"], other["biomedcoop"]["kdsp_lambda"]) == (1.0, 1.0)
    b2n = method_config(cfg, "biomedcoop", "base2new", "dermamnist")  # `all` first, then the dataset's
    assert (b2n["biomedcoop"]["sccm_lambda"], b2n["biomedcoop"]["kdsp_lambda"], b2n["train"]["epochs"]) == (2.0, 0.5,
                                                                                                          50)
    assert b2n["train"]["batch_size"] == 4 and "per_run" not in b2n["biomedcoop"]
    assert method_config(cfg, "kgcoop", "base2new", "pathmnist")["kgcoop"]["weight"] == 8.0
    assert method_config(cfg, "kgcoop", "fewshot", "dermamnist")["kgcoop"]["weight"] == 8.0
    assert method_config(cfg, "kgcoop", "fewshot", "pathmnist")["kgcoop"]["weight"] == 1.0
    assert cfg["biomedcoop"]["per_run"]["fewshot"]["dermamnist"] == {"sccm_lambda": 5.0, "kdsp_lambda": 20.0}  # intact
    # -S on a per-run value, a new entry, and the errors
    assert method_config(config(**{"biomedcoop.per_run.fewshot.pathmnist.tau": 2.0}), "biomedcoop", "fewshot",
                         "pathmnist")["biomedcoop"]["tau"] == 2.0
    with pytest.raises(ConfigError, match=r"biomedcoop.per_run must be a mapping keyed by fewshot or base2new"):
        config(**{"biomedcoop.per_run": {"crossdata": {}}})
    with pytest.raises(ConfigError, match=r"per_run.fewshot must be a mapping keyed by dataset names or 'all'"):
        config(**{"biomedcoop.per_run.fewshot": {"chestmnist": {}}})
    with pytest.raises(ConfigError, match=r"has no key biomedcoop.per_run.fewshot.dermamnist.weight; valid keys "
                                          r"here: kdsp_lambda, sccm_lambda"):
        config(**{"biomedcoop.per_run.fewshot.dermamnist.weight": 1.0})
    with pytest.raises(ConfigError, match=r"biomedcoop.per_run.fewshot.dermamnist.train.lr must be a number > 0"):
        config(**{"biomedcoop.per_run.fewshot.dermamnist.train": {"lr": -1}})
    with pytest.raises(ConfigError, match=r"biomedcoop.per_run.crossdata is not a section of params.yaml"):
        config(**{"biomedcoop.per_run.crossdata.all.tau": 2.0})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) biomedcoop.per_run.fewshot.all.weight"):
        config(**{"biomedcoop.per_run.fewshot.all": {"weight": 1.0}})


def test_overrides_win_over_the_profile():
    cfg = config(profile="demo", train__epochs=3, biovlm__select_ratio=1.0)
    assert cfg["train"]["epochs"] == 3 and cfg["biovlm"]["select_ratio"] == 1.0
    assert "train.epochs" not in cfg["_from_profile"]


def test_method_knobs_match_the_methods():
    """config's knob rules, params.yaml's sections and the methods' DEFAULTS name the same knobs."""
    from biovlm.methods import METHOD_NAMES, _registry

    assert tuple(METHODS) == tuple(METHOD_NAMES)
    registry = _registry()
    for name in METHODS:
        assert set(METHOD_KNOBS[name]) == set(registry[name].DEFAULTS), name
        knobs = {k: v for k, v in (raw()[name] or {}).items() if k not in ("train", "per_run")}
        assert set(knobs) == set(registry[name].DEFAULTS), f"params.yaml section {name}"
        # params.yaml's values are the methods' defaults, except the published "a photo of a" (4 tokens in
        # BiomedCLIP's vocabulary, not in every backbone's: a library default must build on any backbone)
        published = {**registry[name].DEFAULTS, **({"ctx_init": "a photo of a"}
                                                   if name in ("coop", "cocoop", "kgcoop", "biomedcoop") else {})}
        assert knobs == published, f"defaults of {name}"


def test_a_method_may_have_its_own_train_schedule():
    from biovlm.runs import method_config

    cfg = config(**{"cocoop.train.epochs": 3})
    mcfg = method_config(cfg, "cocoop")
    assert mcfg["train"]["epochs"] == 3 and mcfg["train"]["batch_size"] == 1  # CoCoOp's published batch
    assert mcfg["train"]["momentum"] == cfg["train"]["momentum"]  # the rest from the shared section
    assert "train" not in mcfg["cocoop"] and "per_run" not in mcfg["cocoop"]
    assert method_config(cfg, "biovlm")["train"] == cfg["train"]
    with pytest.raises(ConfigError, match=r"cocoop.train.epoch; valid keys here: batch_size, epochs"):
        config(**{"cocoop.train.epoch": 3})
    with pytest.raises(ConfigError, match=r"cocoop.train.lr must be a number > 0"):
        config(**{"cocoop.train.lr": 0})


def test_train_knobs_match_the_loop():
    from biovlm.train import TRAIN_DEFAULTS, train_knobs

    assert set(raw()["train"]) == set(TRAIN_DEFAULTS)
    train_knobs(config())  # the loop accepts the validated section as is


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"datasets": ["pathmnist", "chestmnist"]}, "unknown dataset name(s) ['chestmnist']"),
        ({"datasets": ["pathmnist", "pathmnist"]}, "more than once"),
        ({"methods": ["coop", "maple"]}, "unknown method name(s) ['maple']"),
        ({"settings": ["fewshot", "zero2hero"]}, "unknown setting name(s) ['zero2hero']"),
        ({"backbone.name": "resnet50"}, "unknown backbone.name 'resnet50'"),
        ({"backbone.device": "gpu"}, "backbone.device must be auto, cpu, cuda"),
        ({"biovlm.select_ratio": 0}, "biovlm.select_ratio must be a number in (0, 1], got 0"),
        ({"biovlm.select_ratio": 1.5}, "biovlm.select_ratio must be a number in (0, 1], got 1.5"),
        ({"biovlm.teacher_ratio": -0.1}, "biovlm.teacher_ratio must be a number in (0, 1]"),
        ({"biovlm.bank_size": 0}, "biovlm.bank_size must be a positive integer"),
        ({"biovlm.l_kd": -1}, "biovlm.l_kd must be a number >= 0"),
        ({"biovlm.kl_reduction": "sum"}, "biovlm.kl_reduction must be one of batchmean, reference"),
        ({"fewshot.shots": [0, 4]}, "fewshot.shots must be distinct positive integers"),
        ({"fewshot.shots": [1, 32]}, "raise features.max_shots to 32 or lower fewshot.shots"),
        ({"base2new.shots": 0}, "base2new.shots must be a positive integer"),
        ({"crossdata.sources": ["pathmnist", "chestmnist"]}, "unknown dataset name(s) ['chestmnist'] in crossdata"),
        ({"datasets": ["pathmnist", "octmnist"], "crossdata.sources": ["bloodmnist"]}, "none of crossdata.sources"),
        ({"datasets": ["pathmnist"]}, "crossdata setting needs at least two datasets"),
        ({"seeds": []}, "seeds must be a non-empty list"),
        ({"data.size": 100}, "data.size must be one of 28, 64, 128, 224"),
        ({"train.epochs": 0}, "train.epochs must be a positive integer"),
        ({"train.momentum": 1.0}, "train.momentum must be a number in [0, 1)"),
        ({"filter.keep": 11}, "filter.keep must be at most llm.n = 10"),
        ({"profile": "fast"}, "unknown profile 'fast'; valid profiles: demo, paper"),
    ],
)
def test_bad_values_are_named_with_the_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(PARAMS, overrides)
    assert message in str(err.value)


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match=r"params.yaml has no key biovlm.bank_sz; valid keys here: .*bank_size"):
        config(biovlm__bank_sz=3)
    bad = raw()
    bad["biovlm"]["bank_sz"] = 3
    with pytest.raises(ConfigError, match=r"unknown key\(s\) biovlm.bank_sz; valid keys of biovlm: .*bank_size"):
        checked(bad)
    bad = raw()
    bad["trian"] = {"epochs": 3}
    with pytest.raises(ConfigError, match=r"unknown top-level key\(s\) \['trian'\]"):
        checked(bad)


def conf_copy(tmp_path: Path, profile: str = "", text: str = "") -> Path:
    """The committed conf/ beside a params.yaml in ``tmp_path``, with ``conf/profile/<profile>.yaml`` = ``text``."""
    import shutil

    shutil.copytree(PARAMS.parent / "conf", tmp_path / "conf")
    shutil.copy(PARAMS, tmp_path / "params.yaml")
    if profile:
        (tmp_path / "conf" / "profile" / f"{profile}.yaml").write_text(text)
    return tmp_path / "params.yaml"


def test_params_yaml_is_the_paper_profiles_composition_of_conf():
    """The committed params.yaml is what `dvc exp run` (Hydra, as DVC runs it) writes for the paper profile."""
    assert PARAMS.read_text() == PARAMS_HEADER + compose_text("paper", PARAMS.parent / "conf")
    assert raw()["profile"] == "paper" and "profiles" not in raw() and "defaults" not in raw()


def test_a_profile_is_a_conf_file_merged_over_the_defaults(tmp_path):
    params = conf_copy(tmp_path, "small", "# @package _global_\nprofile: small\ndatasets: [pathmnist, octmnist]\n"
                                          "train:\n  epochs: 3\n")
    cfg = load_config(params, {"profile": "small"})
    assert cfg["datasets"] == ["pathmnist", "octmnist"] and cfg["train"]["epochs"] == 3  # a profile may change both
    assert cfg["train"]["lr"] == raw()["train"]["lr"] and cfg["_from_profile"] == ["datasets", "train.epochs"]
    assert load_config(params, {"profile": "small", "train.epochs": 7})["train"]["epochs"] == 7  # -S wins
    assert compose("small", tmp_path / "conf")["train"]["epochs"] == 3


def test_profile_mistakes_are_named(tmp_path):
    params = conf_copy(tmp_path, "typo", "# @package _global_\nprofile: typo\ntrain:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) train.epoch; valid keys of train: .*epochs"):
        load_config(params, {"profile": "typo"})
    params = conf_copy(tmp_path / "b", "bad", "# @package _global_\nprofile: bad\nfewshot:\n  shots: [0]\n")
    with pytest.raises(ConfigError, match=r"fewshot.shots \(from conf/profile/bad.yaml\) must be"):
        load_config(params, {"profile": "bad"})
    with pytest.raises(ConfigError, match=r"unknown profile 'fast'; valid profiles: demo, paper, project \(add "
                                          r"conf/profile/fast.yaml to make one\)"):
        load_config(PARAMS, {"profile": "fast"})
    old = tmp_path / "old" / "params.yaml"
    old.parent.mkdir()
    old.write_text("profile: paper\nprofiles:\n  demo: {}\n")
    with pytest.raises(ConfigError, match=r"has a 'profiles' section: profiles now live in conf/profile/"):
        load_config(old)


def test_synthetic_hint_names_the_key_to_set():
    with pytest.raises(ConfigError, match=r"set data\.synthetic_n\.train >= 176 or lower the shots$"):
        config(profile="demo", **{"data.synthetic_n.train": 100})
    with pytest.raises(ConfigError, match=r"; set data\.synthetic_n\.val >= 44$"):
        config(profile="demo", **{"data.synthetic_n.val": 20})


def test_synthetic_twins_must_hold_the_shots():
    with pytest.raises(ConfigError, match=r"organamnist has 11 classes.*data.synthetic_n.train >= 176"):
        config(profile="demo", data__synthetic_n={"train": 100, "val": 60, "test": 30})
    with pytest.raises(ConfigError, match=r"data.synthetic_n.val >= 44"):
        config(profile="demo", data__synthetic_n={"train": 400, "val": 20, "test": 30})
    cfg = config(profile="demo", datasets=["breastmnist", "pneumoniamnist"], crossdata__sources="all",
                 data__synthetic_n={"train": 32, "val": 8, "test": 4})
    assert cfg["data"]["synthetic_n"]["train"] == 32


def test_crossdata_sources_outside_the_datasets_are_skipped():
    cfg = config(profile="demo", datasets=["pathmnist", "octmnist", "bloodmnist"])
    assert crossdata_sources(cfg) == ["pathmnist", "bloodmnist"]


def test_missing_or_broken_params_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="run from the repository root"):
        load_config(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("seeds: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "params.yaml")


def test_light_modules_do_not_import_torch():
    code = ("import sys, biovlm.config, biovlm.evaluate, biovlm.report; biovlm.config.load_config(); "
            "heavy = [m for m in ('torch', 'open_clip', 'medmnist', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def _declared_params(stage: dict) -> list[str]:
    return [p for p in stage.get("params", []) if isinstance(p, str)]


def test_dvc_yaml_declares_existing_params_and_the_method_section():
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    params = raw()
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        declared = _declared_params(body)
        assert "profiles" not in declared, name  # params.yaml holds the values themselves
        for key in declared:
            if key == "${item}":
                continue
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"stage {name} declares unknown param {key}"
                node = node[part]
    assert dvc["stages"]["download"]["foreach"] == dvc["stages"]["train"]["foreach"] == "${datasets}"
    train = set(_declared_params(dvc["stages"]["train"]["do"]))
    assert set(METHODS) <= train  # every method section
    assert set(_declared_params(dvc["stages"]["crossdata"])) == train  # it rebuilds the train stages' run hashes
    # no stage depends on knobs it does not read (an ablation reruns only what it touches): each run selects its
    # filter.keep attributes in the train stage; the filter stage computes the table, which keep does not change
    assert "llm" not in train and "filter" in train
    assert "filter" not in _declared_params(dvc["stages"]["filter"])
    for stage in ("download", "attributes", "features", "filter"):
        assert not set(METHODS) & set(_declared_params(dvc["stages"][stage].get("do", dvc["stages"][stage])))


@pytest.mark.parametrize(("text", "value"), [("1e-06", 1e-06), ("1E-6", 1e-06), ("5e+3", 5000.0), ("1.0e-5", 1e-05),
                                              (".5", 0.5), ("2e-3", 0.002)])
def test_floats_in_every_form_dvc_writes_are_numbers(tmp_path, text, value):
    """`dvc exp run -S train.warmup_lr=1e-6` writes `warmup_lr: 1e-06`, which YAML 1.1 reads as a string."""
    params = tmp_path / "params.yaml"
    params.write_text(PARAMS.read_text().replace("  warmup_lr: 1.0e-05\n", f"  warmup_lr: {text}\n", 1))
    assert f"  warmup_lr: {text}\n" in params.read_text()
    cfg = load_config(params)
    assert cfg["train"]["warmup_lr"] == value and isinstance(cfg["train"]["warmup_lr"], float)
    assert isinstance(cfg["train"]["epochs"], int) and cfg["features"]["crop_scale"] == [0.08, 1.0]


def test_python_m_biovlm_config_writes_the_committed_params_yaml(tmp_path, capsys):
    from biovlm.config import main

    params = conf_copy(tmp_path)
    params.write_text("stale\n")
    main(["--out", str(params)])
    assert params.read_text() == PARAMS.read_text() and capsys.readouterr().out == f"wrote {params} (profile 'paper')\n"
    main(["--out", str(params), "--profile", "demo"])
    assert yaml.safe_load(params.read_text()) == compose("demo", tmp_path / "conf")


def test_a_missing_conf_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"conf/config.yaml not found: the configuration params.yaml is "
                                                 r"composed from \(run from the repository root\)"):
        load_config(_params_without_conf(tmp_path), {"profile": "demo"})


def _params_without_conf(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    return tmp_path / "params.yaml"
