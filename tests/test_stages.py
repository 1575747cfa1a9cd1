"""The DVC stage scripts run in process (``main(argv)`` with a temporary params file): their argument and input
errors (one line, naming the missing file and the stage that makes it), which outputs they write, and which
stale outputs they remove.

A module-scoped tiny pipeline (two synthetic twins, the ``tiny`` backbone, one seed, one epoch) runs download,
attributes, features, filter and train once in a temporary folder; evaluate and report read a hand-made results
table whose metrics are computed here by hand. Under DVC, every non-persistent output folder is deleted before
its stage runs; only the persistent ones (``data/raw/<dataset>``, ``checkpoints``) need a stage's own clean-up.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import COMMITTED_PARAMS, listing

from biovlm.config import compose, set_dotted, stage_main
from biovlm.evaluate import RESULT_COLUMNS
from stages import attributes, crossdata, download, evaluate, features, report, train
from stages import filter as filter_stage

DATASETS2 = ["breastmnist", "bloodmnist"]  # 2 and 8 classes
METHODS2 = ["zeroshot", "coop"]
# The demo profile, smaller (what `dvc exp run -S profile=demo -S key=value ...` would write to params.yaml); the
# ALL_PROFILES keys apply to every profile.
TINY = {
    "profile": "demo",
    "seeds": [1],
    "data.synthetic_n": {"train": 32, "val": 32, "test": 16},
    "backbone.name": "tiny",
    "features.views": 1,
    "fewshot.shots": [1, 2],
    "crossdata.sources": "all",
    "train.epochs": 1,
    "datasets": DATASETS2,
    "methods": METHODS2,
    "base2new.shots": 2,
    "crossdata.shots": 2,
    "features.max_shots": 2,
}

ALL_PROFILES = ("datasets", "methods", "base2new.shots", "crossdata.shots", "features.max_shots")


def write_params(path: Path, **overrides) -> Path:
    """params.yaml as `dvc exp run -S profile=<TINY's or overrides'> -S <key=value>...` writes it (composed from the
    committed conf/, then TINY and ``overrides``, dotted keys), written to ``path``."""
    profile = overrides.pop("profile", "demo")
    tiny = TINY if profile == "demo" else {k: v for k, v in TINY.items() if k in ALL_PROFILES}
    values = {**tiny, **overrides}
    values.pop("profile", None)
    raw = compose(profile, COMMITTED_PARAMS.parent / "conf")
    for key, value in values.items():
        set_dotted(raw, key, value)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_error(capsys, name: str, main, argv: list[str]) -> str:
    """Run a stage as ``python -m stages.<name>`` does; return its one-line error (it must exit with status 1)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        stage_main(name, main, argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"{name}: error: "), err
    return err.rstrip("\n")


# ---------------------------------------------------------------------------------------------- the tiny pipeline
@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """download, attributes, features, filter, train (zeroshot, coop; every dataset in one call) and crossdata of the
    tiny profile in a fresh folder, with its own run store.

    Before train, ``checkpoints/bloodmnist/`` holds a folder of a method that is no longer configured."""
    root = tmp_path_factory.mktemp("pipeline")
    write_params(root / "params.yaml")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("BIOVLM_RUN_STORE", str(root / "store"))
        for ds in DATASETS2:
            download.main([ds])
        attributes.main([])
        features.main([])
        filter_stage.main([])
        (root / "checkpoints" / "bloodmnist" / "biovlm" / "fewshot").mkdir(parents=True)
        train.main([])
        crossdata.main([])
    return root


def test_download_writes_a_synthetic_twin_and_keeps_it_while_its_params_hold(built, tmp_path, monkeypatch):
    folder = built / "data" / "raw" / "bloodmnist" / "synthetic"
    manifest = json.loads((folder / "SYNTHETIC.json").read_text())
    assert manifest["bloodmnist.npz"]["counts"] == {"train": 32, "val": 32, "test": 16}
    assert (folder / "bloodmnist.npz").exists() and not (built / "data" / "raw" / "organamnist").exists()

    # a second run with the same params keeps the file; another synthetic seed regenerates it
    monkeypatch.chdir(tmp_path)
    shutil.copytree(built / "data" / "raw", tmp_path / "data" / "raw")
    made = []
    real = download.make_synthetic
    monkeypatch.setattr(download, "make_synthetic", lambda *a, **kw: made.append(kw["seed"]) or real(*a, **kw))
    write_params(tmp_path / "params.yaml")
    download.main(["bloodmnist"])
    assert made == []
    write_params(tmp_path / "params.yaml", **{"data.synthetic_seed": 7})
    download.main(["bloodmnist"])
    assert made == [7]
    entry = json.loads((tmp_path / "data" / "raw" / "bloodmnist" / "synthetic" / "SYNTHETIC.json").read_text())
    assert entry["bloodmnist.npz"]["seed"] == 7


def test_download_refuses_a_dataset_outside_params(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert stage_error(capsys, "download", download.main, ["pathmnist"]) == (
        "download: error: 'pathmnist' is not in params.yaml datasets (breastmnist, bloodmnist); add it there or "
        "download one of those")
    assert not (tmp_path / "data").exists()


def test_download_of_the_paper_profile_verifies_a_present_official_file(official_breastmnist, tmp_path, monkeypatch,
                                                                        capsys):
    """The official npz already in data/raw/<dataset>/ is md5-checked and used, never downloaded again; a damaged
    copy is refused in one line."""
    import biovlm.data

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(biovlm.data, "_download_with_medmnist", lambda *a: pytest.fail("no download expected"))
    write_params(tmp_path / "params.yaml", profile="paper", **{"fewshot.shots": [1, 2], "data.size": 28})
    (tmp_path / "data" / "raw" / "breastmnist").mkdir(parents=True)
    target = tmp_path / "data" / "raw" / "breastmnist" / "breastmnist.npz"
    shutil.copyfile(official_breastmnist / "breastmnist.npz", target)
    capsys.readouterr()
    download.main(["breastmnist"])
    out = capsys.readouterr().out
    assert out.startswith("download breastmnist: profile 'paper'; official file data/raw/breastmnist/breastmnist.npz")
    assert not (tmp_path / "data" / "raw" / "breastmnist" / "synthetic").exists()
    target.write_bytes(target.read_bytes()[:-1] + b"x")
    err = stage_error(capsys, "download", download.main, ["breastmnist"])
    assert err.startswith("download: error: data/raw/breastmnist/breastmnist.npz: md5 ")
    assert "does not match the expected" in err and "Delete it and rerun to download the official file" in err


def test_download_offline_lists_every_file_the_configuration_lacks(tmp_path, monkeypatch, capsys):
    """The first download@ stage that cannot get its file prints the whole list (header, then a line per file)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOVLM_OFFLINE", "1")
    write_params(tmp_path / "params.yaml", profile="paper", **{"fewshot.shots": [1, 2], "data.size": 28})
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        stage_main("download", download.main, ["bloodmnist"])
    assert exc.value.code == 1
    header, *lines = capsys.readouterr().err.rstrip("\n").split("\n")
    assert header.startswith("download: error: 2 of 2 MedMNIST files this configuration needs at 28 px are missing "
                             "or damaged and cannot be downloaded (BIOVLM_OFFLINE is set): on a connected machine, "
                             "download each from its URL below into data/raw/<dataset>/ or, in medmnist's own flat "
                             "layout, into data/raw/ ")
    assert lines == [
        "  breastmnist.npz  missing  613.1 kB  https://zenodo.org/records/10519652/files/breastmnist.npz?download=1",
        "  bloodmnist.npz   missing   40.2 MB  https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1"]
    assert not (tmp_path / "data").exists()


def test_download_uses_a_medmnist_folder_in_place_and_later_stages_read_it(official_breastmnist, tmp_path,
                                                                           monkeypatch, capsys):
    """data.root pointing at medmnist's own flat folder: the file there is verified and read where it is (nothing
    copied or written there); data/raw/breastmnist/ (the DVC output) records it and holds the extracted arrays."""
    import biovlm.data
    from biovlm.predict import split_images

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOVLM_OFFLINE", "1")
    before = listing(official_breastmnist)
    params = write_params(tmp_path / "params.yaml", profile="paper",
                          **{"fewshot.shots": [1, 2], "data.size": 28, "data.root": str(official_breastmnist),
                             "backbone.name": "tiny", "features.views": 1})
    capsys.readouterr()
    download.main(["breastmnist"])
    assert capsys.readouterr().out.startswith(
        f"download breastmnist: profile 'paper'; official file, read in place (arrays extracted into "
        f"data/raw/breastmnist/.extracted/), {official_breastmnist / 'breastmnist.npz'} (0.6 MB, ")
    assert json.loads((tmp_path / "data" / "raw" / "breastmnist" / "IN_PLACE.json").read_text()) == {
        "file": str(official_breastmnist / "breastmnist.npz"), "bytes": 559_580,
        "md5": biovlm.data.official_source("breastmnist", 28)[1]}
    features.main(["--dataset", "breastmnist"])
    assert (tmp_path / "features" / "breastmnist.safetensors").exists()
    assert len(split_images(params, "breastmnist", "test")) == 156
    assert listing(official_breastmnist) == before
    assert (tmp_path / "data" / "raw" / "breastmnist" / ".extracted" / "breastmnist" / "manifest.json").exists()

    # the file copied into the dataset's folder takes precedence: the record of the in-place file goes
    shutil.copyfile(official_breastmnist / "breastmnist.npz", tmp_path / "breastmnist.npz")
    write_params(params, profile="paper", **{"fewshot.shots": [1, 2], "data.size": 28})
    (tmp_path / "breastmnist.npz").rename(tmp_path / "data" / "raw" / "breastmnist" / "breastmnist.npz")
    download.main(["breastmnist"])
    assert not (tmp_path / "data" / "raw" / "breastmnist" / "IN_PLACE.json").exists()


def test_attributes_writes_the_curated_record_of_every_configured_dataset(built):
    from biovlm.attributes import curated

    out = built / "data" / "attributes"
    assert sorted(p.name for p in out.iterdir()) == ["bloodmnist.json", "breastmnist.json"]
    rec = json.loads((out / "breastmnist.json").read_text())
    assert rec == {"dataset": "breastmnist", "source": "curated", "model": None,
                   "classes": ["malignant", "normal, benign"], "attributes": curated("breastmnist")}
    assert len(json.loads((out / "bloodmnist.json").read_text())["attributes"]) == 8


def test_attributes_of_a_model_without_cache_or_key_fail_before_writing(tmp_path, monkeypatch):
    from biovlm.attributes import MissingAPIKeyError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    write_params(tmp_path / "params.yaml", **{"llm.source": "llm", "llm.model": "some-model",
                                              "llm.cache_dir": "cache"})
    with pytest.raises(MissingAPIKeyError, match=r"^10 of 10 attribute requests for model 'some-model' are not in "
                                                 r"the cache cache and OPENAI_API_KEY is not set\. Missing:\n"):
        attributes.main(["--out", "out"])
    assert not (tmp_path / "out").exists()


def test_features_of_every_dataset_hold_the_configured_pool(built):
    from biovlm.features import load_features

    assert sorted(p.name for p in (built / "features").iterdir()) == ["bloodmnist.safetensors",
                                                                      "breastmnist.safetensors"]
    feats = load_features(built / "features" / "bloodmnist.safetensors")
    meta = {k: feats.meta[k] for k in ("dataset", "backbone", "size", "views", "seeds", "max_shots", "n_classes")}
    assert meta == {"dataset": "bloodmnist", "backbone": "tiny", "size": 28, "views": 1, "seeds": [1],
                    "max_shots": 2, "n_classes": 8}
    assert sorted(feats.pool_labels.tolist()) == sorted(list(range(8)) * 2)  # 2 shots of each class, one seed
    assert len(feats.test_labels) == 16


def test_features_of_one_named_dataset_only(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    shutil.copytree(built / "data" / "raw", tmp_path / "data" / "raw")
    features.main(["--dataset", "breastmnist"])
    assert [p.name for p in (tmp_path / "features").iterdir()] == ["breastmnist.safetensors"]
    assert "  breastmnist: features/breastmnist.safetensors (" in capsys.readouterr().out


def test_features_errors_name_the_dataset_or_the_missing_download(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert stage_error(capsys, "features", features.main, ["--dataset", "pathmnist", "--dataset", "bloodmnist"]) == (
        "features: error: ['pathmnist'] not in params.yaml datasets (breastmnist, bloodmnist)")
    assert stage_error(capsys, "features", features.main, []) == (
        "features: error: no data in data/raw/breastmnist/synthetic, data/raw/bloodmnist/synthetic: run the "
        "download stages first (dvc repro)")
    assert not (tmp_path / "features").exists()


def test_filter_tables_score_every_pool_image_against_every_attribute(built):
    from biovlm.features import load_features
    from biovlm.filtering import load_table

    assert sorted(p.name for p in (built / "data" / "filtered").iterdir()) == ["bloodmnist.json", "breastmnist.json"]
    table = load_table(built / "data" / "filtered" / "bloodmnist.json")
    feats = load_features(built / "features" / "bloodmnist.safetensors")
    assert tuple(table.similarity.shape) == (16, 8, 10) and tuple(table.class_similarity.shape) == (16, 8)
    assert table.pool_labels.tolist() == feats.pool_labels.tolist()
    rec = json.loads((built / "data" / "attributes" / "bloodmnist.json").read_text())
    assert table.attributes == rec["attributes"] and table.class_names == rec["classes"]


def test_filter_reads_and_writes_the_folders_it_is_given(built, tmp_path, monkeypatch):
    """--attributes, --features and --out from another working folder give the same tables."""
    from biovlm.filtering import load_table

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    filter_stage.main(["--attributes", str(built / "data" / "attributes"), "--features", str(built / "features"),
                 "--out", "tables"])
    assert sorted(p.name for p in (tmp_path / "tables").iterdir()) == ["bloodmnist.json", "breastmnist.json"]
    mine, theirs = (load_table(d / "breastmnist.json") for d in (tmp_path / "tables", built / "data" / "filtered"))
    assert mine.similarity.equal(theirs.similarity) and mine.pool_indices.tolist() == theirs.pool_indices.tolist()


def test_filter_errors_name_every_missing_input_and_stale_attributes(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert stage_error(capsys, "filter", filter_stage.main, []) == (
        "filter: error: missing inputs data/attributes/breastmnist.json, features/breastmnist.safetensors, "
        "data/attributes/bloodmnist.json, features/bloodmnist.safetensors; run the attributes and features stages")
    # attributes written for other class names (an older attributes stage): refused, nothing written
    shutil.copytree(built / "data" / "attributes", tmp_path / "attrs")
    rec = json.loads((tmp_path / "attrs" / "breastmnist.json").read_text())
    (tmp_path / "attrs" / "breastmnist.json").write_text(json.dumps({**rec, "classes": ["benign", "malignant"]}))
    argv = ["--attributes", "attrs", "--features", str(built / "features"), "--out", "tables"]
    assert stage_error(capsys, "filter", filter_stage.main, argv) == (
        "filter: error: attrs/breastmnist.json lists classes ['benign', 'malignant'], expected "
        "['malignant', 'normal, benign']: rerun the attributes stage")
    assert list((tmp_path / "tables").iterdir()) == []
    # the built (medmnist-named) attributes after a switch to the reference class names: refused as well
    write_params(tmp_path / "params.yaml", **{"data.class_names": "reference"})
    argv = ["--attributes", str(built / "data" / "attributes"), "--features", str(built / "features"),
            "--out", "tables"]
    assert stage_error(capsys, "filter", filter_stage.main, argv) == (
        f"filter: error: {built / 'data' / 'attributes'}/breastmnist.json lists classes ['malignant', "
        f"'normal, benign'], expected ['malignant', 'benign']: rerun the attributes stage")
    assert list((tmp_path / "tables").iterdir()) == []


@pytest.mark.parametrize(("override", "field", "made", "asked"), [
    ({"data.size": 64}, "size", "28", "64"),
    ({"features.views": 2}, "views", "1", "2"),
    ({"features.normalize": "imagenet"}, "transform", "'backbone'", "'imagenet'"),
    ({"backbone.name": "tiny-pretrained"}, "backbone", "'tiny'", "'tiny-pretrained'"),
])
def test_filter_refuses_features_made_with_other_settings(built, tmp_path, monkeypatch, capsys, override, field, made,
                                                          asked):
    """Features of another image size, view count, transform or backbone are never scored (the filter used to check
    the dataset and backbone name only, and re-ranked attributes on 64-px features in a 28-px run)."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", **override)
    argv = ["--attributes", str(built / "data" / "attributes"), "--features", str(built / "features"),
            "--out", "tables"]
    err = stage_error(capsys, "filter", filter_stage.main, argv)
    path = built / "features" / "breastmnist.safetensors"
    assert err.startswith(f"filter: error: {path} does not match params.yaml ({path} was made with {field}=")
    assert made in err and f"but {field}=" in err and asked in err
    assert err.endswith("rerun the features stage (dvc repro features)")
    assert list((tmp_path / "tables").iterdir()) == []


def test_filter_refuses_features_of_other_weights_or_too_few_shots(built, tmp_path, monkeypatch, capsys):
    from biovlm.backbone import Backbone

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", **{"features.max_shots": 4, "fewshot.shots": [1, 4]})
    argv = ["--attributes", str(built / "data" / "attributes"), "--features", str(built / "features"),
            "--out", "tables"]
    path = built / "features" / "breastmnist.safetensors"
    assert stage_error(capsys, "filter", filter_stage.main, argv) == (
        f"filter: error: {path} holds shots for seeds [1] up to K=2, but params.yaml asks for seeds [1] and K up to "
        f"4; rerun the features stage (dvc repro features)")
    write_params(tmp_path / "params.yaml")
    monkeypatch.setattr(Backbone, "fingerprint", property(lambda self: "0" * 64))
    err = stage_error(capsys, "filter", filter_stage.main, argv)
    assert "was made with weights_sha256=" in err and f"but weights_sha256={'0' * 64!r} is asked for" in err


def test_train_writes_results_environment_and_curves_of_every_dataset_and_method(built):
    for ds in DATASETS2:
        for method in METHODS2:
            df = pd.read_csv(built / "results" / ds / f"{method}.csv")
            assert list(df.columns) == list(RESULT_COLUMNS) and set(df.method) == {method} and set(df.target) == {ds}
            assert df.groupby(["setting", "part"]).size().to_dict() == {
                ("base2new", "base"): 1, ("base2new", "novel"): 1, ("fewshot", "all"): 2}
            assert sorted(p.name for p in (built / "checkpoints" / ds / method / "fewshot" / ds).iterdir()) == [
                "k1_seed1.pt", "k2_seed1.pt"]
        assert sorted(p.name for p in (built / "results" / ds).iterdir()) == ["coop.csv", "environment.json",
                                                                              "zeroshot.csv"]
        env = json.loads((built / "results" / ds / "environment.json").read_text())
        assert env["device"].startswith("cpu") and env["backbone"]["name"] == "tiny"
    curve = built / "dvclive" / "bloodmnist" / "coop" / "plots" / "metrics" / "fewshot" / "bloodmnist" / "k2_seed1"
    assert (curve / "loss.tsv").exists()


def test_crossdata_tests_every_source_checkpoint_on_every_dataset(built):
    for method in METHODS2:
        df = pd.read_csv(built / "results" / "crossdata" / f"{method}.csv")
        assert set(df.setting) == {"crossdata"} and len(df) == 4  # 2 sources x 2 targets, seed 1
        assert sorted(zip(df.source, df.target, strict=True)) == sorted((s, t) for s in DATASETS2 for t in DATASETS2)
        diagonal = df[df.source == df.target].set_index("target").accuracy
        for ds in DATASETS2:  # the in-domain diagonal is the few-shot run's own test result
            own = pd.read_csv(built / "results" / ds / f"{method}.csv")
            assert diagonal[ds] == own[(own.setting == "fewshot") & (own.shots == 2)].accuracy.item()


def test_crossdata_needs_the_train_stages_checkpoints(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOVLM_RUN_STORE", str(tmp_path / "empty-store"))
    write_params(tmp_path / "params.yaml")
    for folder in ("features", "data/filtered"):
        shutil.copytree(built / folder, tmp_path / folder)
    shutil.copytree(built / "checkpoints" / "breastmnist", tmp_path / "checkpoints" / "breastmnist")
    assert stage_error(capsys, "crossdata", crossdata.main, []) == (
        "crossdata: error: zeroshot: no current few-shot checkpoint of bloodmnist K=2 seed 1; run the train stages of "
        "those datasets first (dvc repro train@<dataset>)")
    shutil.copytree(built / "checkpoints" / "bloodmnist", tmp_path / "checkpoints" / "bloodmnist")
    crossdata.main([])  # from the checkpoints alone (an empty store)
    for method in METHODS2:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "crossdata" / f"{method}.csv"),
                                      pd.read_csv(built / "results" / "crossdata" / f"{method}.csv"))


def test_train_of_every_method_removes_checkpoints_of_methods_no_longer_configured(built):
    """checkpoints/ persists between DVC runs, so the stage itself drops the folder of a method taken out of
    params.yaml (the fixture made checkpoints/bloodmnist/biovlm/ before training)."""
    for ds in DATASETS2:
        assert sorted(p.name for p in (built / "checkpoints" / ds).iterdir()) == METHODS2[::-1]


def test_train_rerun_reuses_every_checkpoint_of_the_configured_methods(built, tmp_path, monkeypatch, capsys):
    """The clean-up of stale methods leaves the configured methods' run files, so a rerun trains nothing."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    for folder in ("features", "data/filtered", "checkpoints"):
        shutil.copytree(built / folder, tmp_path / folder)
    capsys.readouterr()
    train.main(["--no-live", "--no-store"])
    out = capsys.readouterr().out
    assert "zeroshot: 3 runs (0 trained, 3 reused, 0 of them from the run store)" in out
    assert "coop: 3 runs (0 trained, 3 reused, 0 of them from the run store)" in out
    for ds in DATASETS2:
        for method in METHODS2:
            pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / ds / f"{method}.csv"),
                                          pd.read_csv(built / "results" / ds / f"{method}.csv"))


def test_train_of_one_dataset_takes_its_runs_from_the_store_when_its_checkpoints_are_gone(built, tmp_path,
                                                                                          monkeypatch, capsys):
    """What `dvc exp run` does before the stage runs: it restores checkpoints/<dataset> from the last lock."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BIOVLM_RUN_STORE", str(built / "store"))
    write_params(tmp_path / "params.yaml")
    for folder in ("features", "data/filtered"):
        shutil.copytree(built / folder, tmp_path / folder)
    capsys.readouterr()
    train.main(["--dataset", "bloodmnist", "--no-live"])
    out = capsys.readouterr().out
    assert "coop: 3 runs (0 trained, 3 reused, 3 of them from the run store)" in out
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["bloodmnist"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["bloodmnist"]
    for method in METHODS2:
        pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "bloodmnist" / f"{method}.csv"),
                                      pd.read_csv(built / "results" / "bloodmnist" / f"{method}.csv"))


def test_train_of_named_methods_keeps_the_other_checkpoints(built, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    for folder in ("features", "data/filtered"):
        shutil.copytree(built / folder, tmp_path / folder)
    (tmp_path / "checkpoints" / "bloodmnist" / "biovlm").mkdir(parents=True)
    (tmp_path / "checkpoints" / "bloodmnist" / "coop").mkdir()
    train.main(["zeroshot", "--no-live", "--dataset", "bloodmnist"])
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "bloodmnist").iterdir()) == ["biovlm", "coop",
                                                                                          "zeroshot"]
    assert sorted(p.name for p in (tmp_path / "results" / "bloodmnist").iterdir()) == ["environment.json",
                                                                                      "zeroshot.csv"]
    assert not (tmp_path / "dvclive").exists()
    assert "train bloodmnist zeroshot: 4 rows -> results/bloodmnist/zeroshot.csv (" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "results" / "bloodmnist" / "zeroshot.csv"),
                                  pd.read_csv(built / "results" / "bloodmnist" / "zeroshot.csv"))


def test_train_errors_name_the_method_or_the_missing_inputs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml")
    assert stage_error(capsys, "train", train.main, ["coop", "biovlm"]) == (
        "train: error: method(s) ['biovlm'] not in params.yaml methods (zeroshot, coop)")
    assert stage_error(capsys, "train", train.main, ["--dataset", "pathmnist"]) == (
        "train: error: dataset(s) ['pathmnist'] not in params.yaml datasets (breastmnist, bloodmnist)")
    assert stage_error(capsys, "train", train.main, []) == (
        "train: error: feature file(s) features/breastmnist.safetensors, features/bloodmnist.safetensors missing; "
        "run the features stage first (dvc repro features)")
    assert not (tmp_path / "results").exists() and not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------- evaluate, report
def results_rows(method: str) -> list[dict]:
    """Hand-made results of one method (two datasets, seeds 1 and 2); the expected metrics are worked out in the
    tests below."""
    fewshot = {  # (target, K): accuracy of seeds 1 and 2
        "coop": {("breastmnist", 1): (50, 52), ("breastmnist", 2): (60, 70), ("bloodmnist", 1): (20, 22),
                 ("bloodmnist", 2): (80, 90)},
        "zeroshot": {("breastmnist", 1): (40, 40), ("breastmnist", 2): (40, 40), ("bloodmnist", 1): (30, 30),
                     ("bloodmnist", 2): (30, 30)},
    }[method]
    base_novel = {"coop": {"breastmnist": (90, 60), "bloodmnist": (80, 40)},
                  "zeroshot": {"breastmnist": (70, 70), "bloodmnist": (50, 50)}}[method]
    transfer = {"coop": {("breastmnist", "bloodmnist"): 30, ("bloodmnist", "breastmnist"): 50},
                "zeroshot": {("breastmnist", "bloodmnist"): 20, ("bloodmnist", "breastmnist"): 40}}[method]
    rows = []

    def add(setting, source, target, shots, seed, part, acc):
        rows.append({"method": method, "setting": setting, "source": source, "target": target, "shots": shots,
                     "seed": seed, "part": part, "n_classes": 2, "n": 16, "accuracy": float(acc),
                     "macro_f1": acc - 10.0, "auc": acc + 5.0, "ece": 10.0})

    for seed in (1, 2):
        for (target, k), accs in fewshot.items():
            add("fewshot", target, target, k, seed, "all", accs[seed - 1])
        for target, (base, novel) in base_novel.items():
            add("base2new", target, target, 2, seed, "base", base)
            add("base2new", target, target, 2, seed, "novel", novel)
        for source in DATASETS2:
            for target in DATASETS2:
                acc = fewshot[(source, 2)][seed - 1] if source == target else transfer[(source, target)]
                add("crossdata", source, target, 2, seed, "all", acc)
    return rows[::-1]  # bloodmnist first: the stages must order datasets as params.yaml does


@pytest.fixture
def results_dir(tmp_path, monkeypatch) -> Path:
    """A working folder with params.yaml (tiny profile, seeds 1 and 2) and the results tables of both methods as the
    train and crossdata stages write them (results/<dataset>/<method>.csv, results/crossdata/<method>.csv), plus
    those of a method no longer configured."""
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", **{"seeds": [1, 2]})
    for method in (*METHODS2, "biovlm"):
        rows = results_rows("coop" if method == "biovlm" else method)
        frame = pd.DataFrame(rows)[list(RESULT_COLUMNS)].assign(method=method)
        folder = frame.target.where(frame.setting != "crossdata", "crossdata")
        for name, part in frame.groupby(folder):
            (tmp_path / "results" / name).mkdir(parents=True, exist_ok=True)
            part.to_csv(tmp_path / "results" / name / f"{method}.csv", index=False)
    return tmp_path


def test_evaluate_writes_the_hand_computed_metrics(results_dir, capsys):
    evaluate.main([])
    metrics = results_dir / "metrics"
    summary = json.loads((metrics / "summary.json").read_text())
    # few-shot at K=2, per seed averaged over datasets: coop (60+80)/2, (70+90)/2 -> 75 +- 5
    # base2new: HM of the dataset-average base and novel: coop 2*85*50/135, zeroshot 60
    # crossdata: mean of the off-diagonal transfers: coop (30+50)/2, zeroshot (20+40)/2
    assert summary == {"fewshot": {"zeroshot": 35.0, "coop": 75.0}, "base2new": {"zeroshot": 60.0, "coop": 62.963},
                       "crossdata": {"zeroshot": 30.0, "coop": 40.0}}
    assert json.loads(capsys.readouterr().out) == summary
    fewshot = json.loads((metrics / "detail" / "fewshot.json").read_text())
    assert list(fewshot) == METHODS2  # params.yaml's order; biovlm.csv is not read
    assert list(fewshot["coop"]["k2"]) == ["breastmnist", "bloodmnist", "average"]
    assert fewshot["coop"]["k2"]["breastmnist"]["accuracy"] == {"mean": 65.0, "std": 5.0}
    assert fewshot["coop"]["k2"]["average"]["macro_f1"] == {"mean": 65.0, "std": 5.0}
    base2new = json.loads((metrics / "detail" / "base2new.json").read_text())
    assert base2new["coop"]["breastmnist"]["hm"] == {"mean": 72.0}
    assert base2new["coop"]["average"]["novel"]["accuracy"] == {"mean": 50.0, "std": 0.0}
    crossdata = json.loads((metrics / "detail" / "crossdata.json").read_text())
    assert crossdata["coop"]["bloodmnist"]["breastmnist"] == {"accuracy": {"mean": 50.0, "std": 0.0}}
    assert crossdata["coop"]["average"]["in_domain"]["accuracy"] == {"mean": 75.0, "std": 5.0}
    curve = pd.read_csv(metrics / "plots" / "fewshot_curve.csv")
    assert curve.to_dict("records") == [
        {"method": "zeroshot", "shots": 1, "accuracy": 35.0, "std": 0.0, "data": "synthetic"},
        {"method": "zeroshot", "shots": 2, "accuracy": 35.0, "std": 0.0, "data": "synthetic"},
        {"method": "coop", "shots": 1, "accuracy": 36.0, "std": 1.0, "data": "synthetic"},
        {"method": "coop", "shots": 2, "accuracy": 75.0, "std": 5.0, "data": "synthetic"}]  # the demo's twins
    matrix = pd.read_csv(metrics / "plots" / "crossdata.csv")
    assert list(matrix.columns) == ["method", "source", "target", "accuracy", "data"]
    assert matrix[matrix.method == "coop"].accuracy.tolist() == [65.0, 30.0, 50.0, 85.0]  # params.yaml's order


@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")  # the std of inf
def test_evaluate_refuses_a_non_finite_metric_before_writing_any(results_dir, capsys):
    frame = pd.read_csv(results_dir / "results" / "breastmnist" / "coop.csv")
    frame.loc[(frame.setting == "fewshot") & (frame.target == "breastmnist") & (frame.shots == 2), "accuracy"] = (
        float("inf"))
    frame.to_csv(results_dir / "results" / "breastmnist" / "coop.csv", index=False)
    assert stage_error(capsys, "evaluate", evaluate.main, []) == (
        "evaluate: error: metric fewshot.coop.k2.breastmnist.accuracy.mean is inf")
    assert not list((results_dir / "metrics").glob("*.json"))


@pytest.mark.parametrize("stage", [evaluate, report], ids=["evaluate", "report"])
def test_missing_or_outdated_results_name_the_file_and_the_train_stage(stage, results_dir, capsys):
    name = stage.__name__.split(".")[-1]
    coop = results_dir / "results" / "breastmnist" / "coop.csv"
    pd.read_csv(coop).drop(columns=["ece"]).to_csv(coop, index=False)
    assert stage_error(capsys, name, stage.main, []) == (
        f"{name}: error: results/breastmnist/coop.csv lacks the columns ['ece']; rerun its train stage")
    (results_dir / "results" / "breastmnist" / "zeroshot.csv").unlink()
    assert stage_error(capsys, name, stage.main, ["--out", "elsewhere"]) == (
        f"{name}: error: results file results/breastmnist/zeroshot.csv not found; run its train stage (dvc repro)")
    assert not (results_dir / "elsewhere").exists()


def test_report_writes_tables_figures_and_the_configuration(results_dir, capsys):
    record = {"packages": {"torch": "2.0", "open_clip_torch": "3.0", "kornia": "0.9", "numpy": "2.0"},
              "machine": {"python": "3.11.7", "processor": "x86_64"}, "device": "cpu",
              "git_commit": "0123456789abcdef"}
    (results_dir / "results" / "breastmnist" / "environment.json").write_text(json.dumps(record))
    report.main([])
    md = (results_dir / "report" / "report.md").read_text().splitlines()
    assert md[:7] == ["# biovlm benchmark report", "",
                      "> **Synthetic data: made from synthetic twins of the MedMNIST+ datasets (the offline demo), "
                      "not benchmark results.**", "",
                      "Configuration: profile `demo`; backbone `tiny`, 28 px synthetic twins, seeds [1, 2], "
                      "1 epochs (see params.yaml and dvc.lock).", "",
                      "Environment: Python 3.11.7, torch 2.0, open_clip 3.0, kornia 0.9, numpy 2.0, cpu, "
                      "commit 0123456789ab."]
    # the demo's data are synthetic twins: every table says so
    caption = "**SYNTHETIC DATA: Few-shot accuracy (%), K = 2 (shots per class)**"
    assert "| Zero-shot | CoOp |" in md[md.index(caption) + 2]
    assert sum(line.startswith("**SYNTHETIC DATA: ") for line in md) == 11  # 5 few-shot, 3 b2n, 1 + 2 cross
    assert "| BreastMNIST | 40.0 ± 0.0 | **65.0 ± 5.0** |" in md
    assert "| **Average** | 35.0 ± 0.0 | **75.0 ± 5.0** |" in md
    assert not any("biovlm" in line for line in md[1:])  # the method no longer configured is not reported
    assert sorted(p.name for p in (results_dir / "report" / "figures").iterdir()) == [
        "base2new.png", "crossdata_heatmap.png", "fewshot_average.png", "fewshot_per_dataset.png"]
    assert r"\toprule" in (results_dir / "report" / "tables.tex").read_text()
    assert capsys.readouterr().out.startswith("report: report/report.md, report/tables.tex, report/figures/")


def test_report_header_of_the_paper_profile_without_environment(results_dir):
    write_params(results_dir / "params.yaml", profile="paper", seeds=[1, 2], **{"fewshot.shots": [1, 2]})
    report.main(["--out", "paper"])
    md = (results_dir / "paper" / "report.md").read_text().splitlines()
    assert md[2] == ("Configuration: profile `paper`; backbone `biomedclip`, 224 px MedMNIST+, seeds [1, 2], "
                     "50 epochs (see params.yaml and dvc.lock).")
    assert not any("SYNTHETIC" in line or "Synthetic data" in line for line in md)
    assert "SYNTHETIC" not in (results_dir / "paper" / "tables.tex").read_text()
    assert not any(line.startswith("Environment:") for line in md)


# ---------------------------------------------------------------------------------------------- every stage
EVERY_STAGE = [("download", download, ["breastmnist"]), ("attributes", attributes, []), ("features", features, []),
               ("filter", filter_stage, []), ("train", train, []), ("crossdata", crossdata, []),
               ("evaluate", evaluate, []), ("report", report, [])]


@pytest.mark.parametrize(("name", "stage", "argv"), EVERY_STAGE, ids=[s[0] for s in EVERY_STAGE])
def test_every_stage_names_a_missing_params_file(name, stage, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert stage_error(capsys, name, stage.main, [*argv, "--params", "nope.yaml"]) == (
        f"{name}: error: nope.yaml not found: run from the repository root (where params.yaml lives)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("name", "stage", "argv"), EVERY_STAGE, ids=[s[0] for s in EVERY_STAGE])
def test_every_stage_refuses_an_unknown_option_with_its_usage(name, stage, argv, capsys):
    with pytest.raises(SystemExit) as exc:
        stage.main([*argv, "--epochs=3"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: python -m stages.{name} ")  # what the user types, not __main__.py
    assert err.endswith("error: unrecognized arguments: --epochs=3\n")


def test_every_stage_reports_a_bad_params_value_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", **{"train.epochs": 0})
    for name, stage, argv in EVERY_STAGE:
        assert stage_error(capsys, name, stage.main, argv) == (
            f"{name}: error: params.yaml: train.epochs must be a positive integer, got 0")
    assert list(tmp_path.iterdir()) == [tmp_path / "params.yaml"]


def test_download_needs_a_dataset_argument(capsys):
    with pytest.raises(SystemExit) as exc:
        download.main([])
    assert exc.value.code == 2
    assert capsys.readouterr().err.endswith("error: the following arguments are required: dataset\n")


class _Parsed(Exception):
    pass


@pytest.mark.parametrize(("name", "stage", "argv"), EVERY_STAGE)
def test_every_option_of_every_stage_is_described(name, stage, argv, monkeypatch):
    """`python -m stages.<name> --help`: the command the user types, a plain-text description, help on every option."""
    import argparse

    seen = []

    def capture(parser, *args, **kwargs):
        seen.append(parser)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed):
        stage.main(argv)
    [parser] = seen
    assert parser.prog == f"python -m stages.{name}" and parser.description and "``" not in parser.description
    undocumented = [a.dest for a in parser._actions if not a.help]
    assert undocumented == []
