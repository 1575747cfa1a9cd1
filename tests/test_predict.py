"""Applying trained runs to new images (biovlm/predict.py, biovlm/checkpoints.py, Method.from_checkpoint): on runs
the project's own train path writes with the tiny backbone, each input kind gives the probabilities the run's own
evaluation gives, and each bad input is one line naming the problem and the fix."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from conftest import COMMITTED_PARAMS, ROOT
from test_runs import input_config, input_files  # noqa: F401 (a fixture: feature files of breastmnist and bloodmnist)

from biovlm import predict as predict_cli
from biovlm import runs
from biovlm.config import compose, stage_main
from biovlm.data import DATASETS, custom_dataset, get_dataset
from biovlm.evaluate import classification_metrics
from biovlm.features import load_features
from biovlm.methods import Method, build_method
from biovlm.methods.base import CHECKPOINT_VERSION
from biovlm.methods.coop import CoOp
from biovlm.train import predict


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


@pytest.fixture(scope="module")
def trained(input_files, tiny_backbone, tmp_path_factory):  # noqa: F811
    """Run files of the train path: coop (few-shot and base-to-novel) and linear_probe (few-shot), K=4, seed 1, as
    the train stage lays them out (checkpoints/<dataset>/<method>/<setting>/<dataset>/k4_seed1.pt)."""
    cfg = input_config(settings=["fewshot", "base2new"], **{"fewshot.shots": [4]})
    inputs = runs.load_inputs(cfg, input_files / "features", input_files / "filtered")
    root = tmp_path_factory.mktemp("checkpoints")
    for method in ("coop", "linear_probe"):
        for ds in inputs:
            runs.run_method(method, cfg, tiny_backbone, inputs, root / ds / method, echo=lambda line: None,
                            datasets=[ds], crossdata=False)

    def run(ds: str, method: str = "coop", setting: str = "fewshot") -> Path:
        return root / ds / method / setting / ds / "k4_seed1.pt"

    return SimpleNamespace(root=root, features=input_files / "features", inputs=inputs, run=run)


@pytest.fixture
def cli(tiny_backbone, monkeypatch, tmp_path, capsys):
    """``python -m biovlm.predict ARGS`` in this process (in ``tmp_path``), the session's tiny backbone standing in
    for a fresh load: returns (exit code, stdout, stderr)."""
    loaded = []

    def load_backbone(name, device="cpu", cache_dir=None):
        loaded.append(name)
        if name == "tiny-copy":  # the same weights under another name
            same = copy.copy(tiny_backbone)
            same.name = name
            return same
        return tiny_backbone if name == "tiny" else SimpleNamespace(name=name, fingerprint="f" * 64)

    monkeypatch.setattr("biovlm.backbone.load_backbone", load_backbone)
    monkeypatch.chdir(tmp_path)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            stage_main("predict", predict_cli.main, ["--quiet", *map(str, args)], exit_code=2)
            code = 0
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    run.loaded = loaded
    return run


def probabilities(table: pd.DataFrame) -> np.ndarray:
    return table[[c for c in table.columns if c.startswith("p_")]].to_numpy()


def expected_probs(run_file: Path, backbone, features: torch.Tensor, names=None, info=None) -> np.ndarray:
    method = Method.from_checkpoint(run_file, backbone)
    return predict(method, features, names or method.class_names, info or method.info, method.attributes).numpy()


# ---------------------------------------------------------------------------------------------- input kinds
def test_an_npz_split_gives_the_runs_own_evaluation(trained, synthetic_root, tiny_backbone, cli, tmp_path):
    code, out, err = cli(trained.run("bloodmnist"), "--npz", synthetic_root / "bloodmnist.npz", "--batch-size", 128)
    assert code == 0, err
    path = tmp_path / "predictions/coop/fewshot/bloodmnist/k4_seed1/bloodmnist-test.csv"
    assert out.splitlines()[-1] == "predict: wrote predictions/coop/fewshot/bloodmnist/k4_seed1/bloodmnist-test.csv " \
                                   "(88 rows)"
    assert out.splitlines()[0].startswith("predict: coop of ") and "on 88 images (bloodmnist-test); 8 classes; " \
        "backbone tiny on cpu, images at 28 px, colour, backbone normalisation" in out
    table = pd.read_csv(path)
    names = list(get_dataset("bloodmnist").prompt_names)
    assert list(table.columns) == ["image", *[f"p_{n}" for n in names], "predicted", "label"]
    probs = probabilities(table)
    assert table.image.tolist() == list(range(88))
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-6)
    assert table.predicted.tolist() == [names[i] for i in probs.argmax(axis=1)]
    test = load_features(trained.features / "bloodmnist.safetensors")
    assert table.label.tolist() == [names[i] for i in test.test_labels]
    # the run's evaluation, on the feature file's test features: the same numbers
    np.testing.assert_allclose(probs, expected_probs(trained.run("bloodmnist"), tiny_backbone, test.test_features),
                               rtol=0, atol=1e-7)
    row = torch.load(trained.run("bloodmnist"), weights_only=True)["rows"][0]
    metrics = classification_metrics(probs, test.test_labels.numpy())
    assert {k: row[k] for k in metrics} == pytest.approx(metrics, abs=1e-9)


def test_another_backbone_name_with_the_runs_weights_and_a_bare_method_checkpoint(trained, synthetic_root, cli,
                                                                                  tmp_path):
    run, npz = trained.run("bloodmnist"), synthetic_root / "bloodmnist.npz"
    assert cli(run, "--npz", npz, "--out", "own.csv")[0] == 0
    assert cli(run, "--npz", npz, "--backbone", "tiny-copy", "--out", "copy.csv")[0] == 0
    assert cli.loaded == ["tiny", "tiny-copy"]
    own = pd.read_csv(tmp_path / "own.csv")
    assert own.equals(pd.read_csv(tmp_path / "copy.csv"))
    # a bare method checkpoint records no image size or normalisation: the options give them
    torch.save(torch.load(run, weights_only=True)["checkpoint"], tmp_path / "method.pt")
    code, out, _ = cli(tmp_path / "method.pt", "--npz", npz, "--normalize", "backbone", "--size", "28")
    assert code == 0 and "predictions/coop/method/bloodmnist-test.csv" in out
    assert pd.read_csv(tmp_path / "predictions/coop/method/bloodmnist-test.csv").equals(own)
    code, out, _ = cli(tmp_path / "method.pt", "--npz", npz, "--out", "defaults.csv")
    assert code == 0 and "images at 32 px, colour, imagenet normalisation (not recorded: --normalize to change)" in out
    assert probabilities(pd.read_csv(tmp_path / "defaults.csv")).tolist() != probabilities(own).tolist()


def test_image_features_equal_the_feature_files_test_features(trained, synthetic_root, tiny_backbone):
    images = predict_cli.npz_images(synthetic_root / "breastmnist.npz", "test")
    features = predict_cli.image_features(tiny_backbone, images, 28, True, "backbone", 128, progress=False)
    assert torch.equal(features, load_features(trained.features / "breastmnist.safetensors").test_features)


def test_a_configured_split_and_another_datasets_classes(trained, synthetic_root, tiny_backbone, cli, tmp_path):
    raw = compose("demo", COMMITTED_PARAMS.parent / "conf")  # what `dvc exp run -S profile=demo` writes
    raw["data"]["root"] = str(tmp_path / "raw")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw))
    for ds in ("bloodmnist", "breastmnist"):
        folder = tmp_path / "raw" / ds / "synthetic"  # where the download stage keeps a synthetic twin
        folder.mkdir(parents=True)
        shutil.copy(synthetic_root / f"{ds}.npz", folder)
        shutil.copy(synthetic_root / "SYNTHETIC.json", folder)
    run = trained.run("bloodmnist")
    code, _, err = cli(run, "--dataset", "bloodmnist", "--params", params, "--split", "val", "--out", "val.csv")
    assert code == 0, err
    code, _, err = cli(run, "--npz", synthetic_root / "bloodmnist.npz", "--split", "val", "--out", "npz.csv")
    assert code == 0, err
    assert pd.read_csv(tmp_path / "val.csv").equals(pd.read_csv(tmp_path / "npz.csv"))
    assert len(pd.read_csv(tmp_path / "val.csv")) == 44
    # another dataset's split: its own classes by default, its labels named by them (the cross-dataset setting)
    code, _, err = cli(run, "--dataset", "breastmnist", "--params", params)
    assert code == 0, err
    table = pd.read_csv(tmp_path / "predictions/coop/fewshot/bloodmnist/k4_seed1/breastmnist-test.csv")
    breast = get_dataset("breastmnist")
    assert list(table.columns) == ["image", "p_malignant", "p_normal, benign", "predicted", "label"]
    test = load_features(trained.features / "breastmnist.safetensors")
    assert table.label.tolist() == [breast.prompt_names[i] for i in test.test_labels]
    np.testing.assert_allclose(probabilities(table), expected_probs(run, tiny_backbone, test.test_features,
                                                                    list(breast.prompt_names), breast), atol=1e-7)


def save_png(path: Path, image: np.ndarray, **kwargs) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, **kwargs)


def test_a_folder_of_images_gives_what_the_same_images_in_an_npz_give(trained, synthetic_root, cli, tmp_path):
    with np.load(synthetic_root / "bloodmnist.npz") as npz:
        images = npz["test_images"]
    for i, image in enumerate(images):  # lossless: the same pixels as the npz
        save_png(tmp_path / "scans" / ("more" if i >= 80 else ".") / f"img_{i:03d}.png", image)
    (tmp_path / "scans" / "notes.txt").write_text("not an image")
    run = trained.run("bloodmnist")
    assert cli(run, "--images", tmp_path / "scans", "--batch-size", 128)[0] == 0
    table = pd.read_csv(tmp_path / "predictions/coop/fewshot/bloodmnist/k4_seed1/scans.csv")
    assert cli(run, "--npz", synthetic_root / "bloodmnist.npz", "--batch-size", 128, "--out", "npz.csv")[0] == 0
    reference = pd.read_csv(tmp_path / "npz.csv")
    assert table.image.tolist() == [f"img_{i:03d}.png" for i in range(80)] + [f"more/img_{i:03d}.png"
                                                                              for i in range(80, 88)]
    assert "label" not in table.columns  # a folder has no labels
    np.testing.assert_array_equal(probabilities(table), probabilities(reference))
    assert table.predicted.tolist() == reference.predicted.tolist()


def test_images_are_brought_to_the_runs_size_and_channels(trained, cli, tmp_path):
    rng = np.random.default_rng(0)
    save_png(tmp_path / "mixed" / "colour.jpg", rng.integers(0, 256, (50, 40, 3), dtype=np.uint8), quality=95)
    save_png(tmp_path / "mixed" / "grey.png", rng.integers(0, 256, (28, 28), dtype=np.uint8))
    save_png(tmp_path / "mixed" / "rgba.PNG", rng.integers(0, 256, (64, 64, 4), dtype=np.uint8))
    for ds in ("breastmnist", "bloodmnist"):  # a grey run and a colour one
        code, _, err = cli(trained.run(ds), "--images", tmp_path / "mixed", "--out", f"{ds}.csv")
        assert code == 0, err
        table = pd.read_csv(tmp_path / f"{ds}.csv")
        assert table.image.tolist() == ["colour.jpg", "grey.png", "rgba.PNG"]
        np.testing.assert_allclose(probabilities(table).sum(axis=1), 1, atol=1e-6)
    grey = predict_cli.conform(np.full((50, 40, 3), 200, np.uint8), 28, grey=True)
    assert grey.shape == (28, 28) and grey.dtype == np.uint8 and (grey == 200).all()
    colour = predict_cli.conform(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), 28, grey=False)
    assert colour.shape == (28, 28, 3) and (colour == colour[..., :1]).all()
    same = np.zeros((28, 28, 3), np.uint8)
    assert predict_cli.conform(same, 28, grey=False) is same


def test_a_custom_class_list_from_the_command_line_or_a_file(trained, synthetic_root, tiny_backbone, cli, tmp_path):
    run = trained.run("bloodmnist")
    names = ["neutrophil", "platelet", "eosinophil"]  # three of the run's classes, reordered
    assert cli(run, "--npz", synthetic_root / "bloodmnist.npz", "--classes", " neutrophil,platelet, eosinophil ",
               "--out", "list.csv")[0] == 0
    (tmp_path / "classes.txt").write_text("neutrophil\n\nplatelet\neosinophil\n")
    assert cli(run, "--npz", synthetic_root / "bloodmnist.npz", "--classes", "classes.txt", "--out", "file.csv")[0] == 0
    table = pd.read_csv(tmp_path / "list.csv")
    assert table.equals(pd.read_csv(tmp_path / "file.csv"))
    assert list(table.columns) == ["image", *[f"p_{n}" for n in names], "predicted", "label"]
    info = custom_dataset(names, like=Method.from_checkpoint(run, tiny_backbone).info)
    features = load_features(trained.features / "bloodmnist.safetensors").test_features
    np.testing.assert_allclose(probabilities(table), expected_probs(run, tiny_backbone, features, names, info),
                               atol=1e-7)
    # new class names: a prompt learner reads any; the linear probe only the classes it learned
    assert cli(run, "--npz", synthetic_root / "bloodmnist.npz", "--classes", "sickle cell,target cell",
               "--out", "new.csv")[0] == 0
    assert list(pd.read_csv(tmp_path / "new.csv").columns)[1:3] == ["p_sickle cell", "p_target cell"]
    probe = trained.run("bloodmnist", "linear_probe")
    assert cli(probe, "--npz", synthetic_root / "bloodmnist.npz", "--classes", "platelet,neutrophil",
               "--out", "probe.csv")[0] == 0
    code, _, err = cli(probe, "--npz", synthetic_root / "bloodmnist.npz", "--classes", "sickle cell,platelet")
    assert code == 2 and err == ("predict: error: linear_probe was trained on bloodmnist classes "
                                 f"{list(get_dataset('bloodmnist').prompt_names)} and cannot classify unseen classes "
                                 "['sickle cell'] of bloodmnist\n")


def test_custom_dataset_keeps_the_wording_of_the_dataset_it_is_like():
    blood = get_dataset("bloodmnist", "reference", "reference", "a photo of a {}.")
    info = custom_dataset(["a", "b"], like=blood)
    assert info.prompt_names == ("a", "b") and info.n_classes == 2 and info.n_samples == {}
    assert (info.name, info.modality, info.hand_template, info.attribute_template, info.reference_phrase,
            info.n_channels) == ("bloodmnist", blood.modality, "a photo of a {}.", "reference",
                                 blood.reference_phrase, 3)
    plain = custom_dataset(("cat", "dog"), name="pets", modality="photo")
    assert (plain.name, plain.modality, plain.prompt_names, plain.hand_template) == \
        ("pets", "photo", ("cat", "dog"), "a {modality} of {}.")
    with pytest.raises(ValueError, match=exactly("a class list needs at least two classes (a classifier chooses "
                                                 "between them), got ['cat']")):
        custom_dataset(["cat"])
    with pytest.raises(ValueError, match=exactly("class names must be distinct; repeated: ['cat']")):
        custom_dataset(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match=exactly("class names must be non-empty strings, got ['cat', ' ']")):
        custom_dataset(["cat", " "])


# ---------------------------------------------------------------------------------------------- from_checkpoint
def test_from_checkpoint_reads_every_form_of_a_checkpoint(trained, tiny_backbone, tmp_path):
    path = trained.run("bloodmnist", "linear_probe")
    state = torch.load(path, weights_only=True)
    torch.save(state["checkpoint"], tmp_path / "method.pt")
    for source in (path, str(path), state, state["checkpoint"], tmp_path / "method.pt"):
        method = Method.from_checkpoint(source, tiny_backbone)
        assert type(method).__name__ == "LinearProbe" and not method.training
        again = method.checkpoint()
        assert again["meta"] == state["checkpoint"]["meta"]  # knobs, classes, chosen C, prompt wording
        assert again["tensors"].keys() == state["checkpoint"]["tensors"].keys()
        assert all(torch.equal(again["tensors"][k], v) for k, v in state["checkpoint"]["tensors"].items())
    assert state["features"] == {k: load_features(trained.features / "bloodmnist.safetensors").meta[k]
                                 for k in ("size", "transform", "backbone", "weights_sha256")}


def test_from_checkpoint_restores_knobs_attributes_and_a_custom_dataset(tiny_backbone):
    info = custom_dataset(["round cell", "flat cell", "spiky cell"], name="cells", modality="smear")
    attributes = [["a nucleus"], ["no nucleus"], ["spikes", "granules"]]
    method = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 2, "n_ctx": 3}}, info,
                          attributes=attributes, class_ids=[2, 0])
    with torch.no_grad():
        method.ctx.normal_()
    state = method.checkpoint()
    json.dumps(state["meta"])  # the metadata is JSON
    rebuilt = Method.from_checkpoint(state, tiny_backbone)
    assert rebuilt.knobs == method.knobs and rebuilt.knobs["bank_size"] == 2 and rebuilt.knobs["n_ctx"] == 3
    assert rebuilt.info == info and rebuilt.class_ids == [2, 0] and rebuilt.attributes == [attributes[2], attributes[0]]
    assert torch.equal(rebuilt.ctx, method.ctx)
    features = torch.nn.functional.normalize(torch.randn(5, tiny_backbone.embed_dim), dim=-1)
    assert torch.equal(predict(rebuilt, features, info.prompt_names, info),
                       predict(method, features, info.prompt_names, info))
    assert type(CoOp.from_checkpoint(build_method("coop", tiny_backbone, {}, info).checkpoint(),
                                     tiny_backbone)) is CoOp


def test_the_hand_template_of_a_checkpoint_is_the_one_it_was_trained_with(tiny_backbone):
    published = get_dataset("breastmnist", hand_template="a photo of a {}.")
    method = build_method("zeroshot", tiny_backbone, {}, published)
    rebuilt = Method.from_checkpoint(method.checkpoint(), tiny_backbone)
    assert rebuilt.info.hand_template == "a photo of a {}."
    features = torch.nn.functional.normalize(torch.randn(4, tiny_backbone.embed_dim), dim=-1)
    project = predict(rebuilt, features, published.prompt_names, get_dataset("breastmnist"))
    assert torch.equal(predict(rebuilt, features, rebuilt.class_names, rebuilt.info),
                       predict(method, features, published.prompt_names, published))
    assert not torch.equal(project, predict(method, features, published.prompt_names, published))


def test_checkpoints_that_cannot_be_loaded_say_why(trained, tiny_backbone, tmp_path):
    path = trained.run("bloodmnist", "linear_probe")
    state = torch.load(path, weights_only=True)
    meta = state["checkpoint"]["meta"]

    def error(source, backbone=tiny_backbone, cls=Method) -> str:
        with pytest.raises(ValueError) as info:
            cls.from_checkpoint(source, backbone)
        return str(info.value)

    assert error(path, SimpleNamespace(name="tiny-clip")) == (
        f"{path} was trained with backbone 'tiny', but the backbone given is 'tiny-clip'; load 'tiny' "
        "(python -m biovlm.predict does by default)")
    assert error(path, cls=CoOp) == (f"{path} is a checkpoint of method 'linear_probe', not 'coop'; "
                                     "Method.from_checkpoint loads any method")
    old = {**state, "checkpoint": {**state["checkpoint"], "meta": {**meta, "version": 1}}}
    assert CHECKPOINT_VERSION == 2
    assert error(old) == ("the checkpoint has checkpoint format 1, this code reads format 2; retrain it with this "
                          "code (dvc repro train@bloodmnist)")
    unknown = {"meta": {**meta, "method": "prompt_soup"}, "tensors": {}}
    assert error(unknown) == ("the checkpoint is a checkpoint of method 'prompt_soup', which this code does not have "
                              "(methods: zeroshot, zeroshot_attr, coop, cocoop, kgcoop, biomedcoop, clip_adapter, "
                              "linear_probe, biovlm)")
    assert error({"hash": "h", "rows": []}) == (
        "the checkpoint holds result rows but no trained method (a cross-dataset result file?); give a run file of "
        "the train stage (checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt)")
    assert error({"weights": 1}) == (
        "the checkpoint is neither a method checkpoint ({'meta', 'tensors'}) nor a run file of the train stage "
        "(checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt)")
    (tmp_path / "notes.pt").write_text("not a torch file")
    assert re.fullmatch(rf"{re.escape(str(tmp_path / 'notes.pt'))} is not a readable checkpoint \(\w+: .+\); give a "
                        r"run file of the train stage \(.+\) or a saved Method.checkpoint\(\)",
                        error(tmp_path / "notes.pt"))
    with pytest.raises(FileNotFoundError, match=exactly(
            f"checkpoint {tmp_path / 'none.pt'} does not exist; give a run file of the train stage "
            "(checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt) or a saved Method.checkpoint()")):
        Method.from_checkpoint(tmp_path / "none.pt", tiny_backbone)


# ---------------------------------------------------------------------------------------------- the command's errors
def test_every_bad_input_is_one_line_with_exit_code_2(trained, synthetic_root, cli, tmp_path):
    run, npz = trained.run("bloodmnist"), synthetic_root / "bloodmnist.npz"

    def error(*args) -> str:
        code, out, err = cli(*args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("predict: error: "), (code, err)
        return err.removeprefix("predict: error: ").rstrip("\n")

    state = torch.load(run, weights_only=True)
    weights = state["features"]["weights_sha256"]
    assert error(run, "--npz", npz, "--backbone", "tiny-clip") == (
        f"the weights of backbone 'tiny-clip' (sha256 ffffffffffff) are not the ones {run} was trained with ('tiny', "
        f"sha256 {weights[:12]}); load those weights (--cache-dir, or drop --backbone)")
    torch.save(state["checkpoint"], tmp_path / "method.pt")  # no record of the weights: the name decides
    assert error(tmp_path / "method.pt", "--npz", npz, "--backbone", "tiny-copy") == (
        f"{tmp_path / 'method.pt'} was trained with backbone 'tiny', but the backbone given is 'tiny-copy'; load "
        "'tiny' (python -m biovlm.predict does by default)")
    torch.save({**state, "features": {**state["features"], "weights_sha256": "0" * 64}}, tmp_path / "other.pt")
    assert error(tmp_path / "other.pt", "--npz", npz) == (
        f"the weights of backbone 'tiny' (sha256 {weights[:12]}) are not the ones {tmp_path / 'other.pt'} was trained "
        "with ('tiny', sha256 000000000000); load those weights (--cache-dir, or drop --backbone)")
    old = {**state, "checkpoint": {**state["checkpoint"], "meta": {**state["checkpoint"]["meta"], "version": 1}}}
    torch.save(old, tmp_path / "old.pt")
    assert error(tmp_path / "old.pt", "--npz", npz) == (
        f"{tmp_path / 'old.pt'} has checkpoint format 1, this code reads format 2; retrain it with this code "
        "(dvc repro train@bloodmnist)")
    assert error("missing.pt", "--npz", npz) == (
        "checkpoint missing.pt does not exist; give a run file of the train stage "
        "(checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt) or a saved Method.checkpoint()")
    # images and classes: found before the backbone loads, but for unreadable images (read batch by batch)
    loads = len(cli.loaded)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("no images here")
    assert error(run, "--images", tmp_path / "empty") == (
        f"{tmp_path / 'empty'} holds no PNG or JPEG image (*.png, *.jpg, *.jpeg, subfolders included); point "
        "--images at the folder that holds them")
    assert error(run, "--images", tmp_path / "nowhere") == f"image folder {tmp_path / 'nowhere'} does not exist"
    save_png(tmp_path / "scans" / "good.png", np.zeros((28, 28, 3), np.uint8))
    (tmp_path / "scans" / "broken.png").write_bytes(b"\x89PNG not really")
    assert re.fullmatch(rf"cannot read image {re.escape(str(tmp_path / 'scans' / 'broken.png'))} "
                        r"\(UnidentifiedImageError: .+\); fix or remove the file",
                        error(run, "--images", tmp_path / "scans"))
    (tmp_path / "scans" / "broken.png").unlink()
    save_png(tmp_path / "scans" / "deep.png", np.full((28, 28), 4000, np.uint16))
    assert error(run, "--images", tmp_path / "scans") == (
        f"image {tmp_path / 'scans' / 'deep.png'} has I;16 pixels (more than 8 bits); convert it to 8-bit grey or "
        "colour first (windowed as the training images were)")
    assert error(run, "--npz", tmp_path / "none.npz") == f"npz file {tmp_path / 'none.npz'} does not exist"
    assert error(run, "--npz", npz, "--split", "holdout") == "unknown split 'holdout'; valid splits: train, val, test"
    np.savez(tmp_path / "partial.npz", test_images=np.zeros((2, 28, 28, 3), np.uint8))
    assert error(run, "--npz", tmp_path / "partial.npz", "--split", "val") == (
        f"{tmp_path / 'partial.npz'} has no 'val_images' array (it holds test_images); an .npz in MedMNIST layout "
        "holds <split>_images and <split>_labels: choose --split")
    assert error(trained.run("breastmnist"), "--npz", npz) == (
        "bloodmnist-test has label ids [2, 3, 4, 5, 6], but breastmnist has 2 classes; is it an .npz of breastmnist?")
    assert error(run, "--dataset", "chestmnist") == ("unknown dataset 'chestmnist' (multi-label: not part of this "
                                                     f"single-label benchmark); valid names: {', '.join(DATASETS)}")
    # classes
    assert error(run, "--npz", npz, "--classes", "platelet") == (
        "a class list needs at least two classes (a classifier chooses between them), got ['platelet']")
    assert error(run, "--npz", npz, "--classes", "platelet,platelet") == (
        "class names must be distinct; repeated: ['platelet']")
    assert error(run, "--npz", npz, "--classes", "mine.txt") == (
        "class file mine.txt does not exist; give a file with one class per line or the names separated by commas")
    assert error(trained.run("breastmnist", setting="base2new"), "--npz", synthetic_root / "breastmnist.npz") == (
        f"{trained.run('breastmnist', setting='base2new')} was trained on one class ['malignant'], and a classifier "
        "needs two; give the classes to choose from with --classes")
    assert error(run, "--npz", npz, "--batch-size", "0") == "--batch-size must be a positive number of images, got 0"
    assert len(cli.loaded) == loads + 2
    assert not (tmp_path / "predictions").exists()  # no failed call wrote a file


def test_the_command_runs_as_a_module_and_documents_every_option(tmp_path):
    # from the checkout's root, as a user runs it (and as mutmut's copy must: its mutated modules find their code there)
    proc = subprocess.run([sys.executable, "-m", "biovlm.predict", "missing.pt", "--images", "scans"], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("predict: error: checkpoint missing.pt does not exist; give a run file of the train stage "
                           "(checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt) or a saved "
                           "Method.checkpoint()\n")
    parser = predict_cli.build_parser()
    assert parser.prog == "python -m biovlm.predict"
    assert all(action.help for action in parser._actions), [a.dest for a in parser._actions if not a.help]
