"""Fast tests of the run orchestration (biovlm/runs.py): plans, hashes, files, input checks, and the numbers a run
reports, each against an independent computation (the slow end-to-end pipeline is in tests/test_pipeline.py)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import demo_transform
from test_pipeline import DATASETS2, fake_inputs, small_config

from biovlm import plan as planning
from biovlm import runs, storage
from biovlm.data import get_dataset
from biovlm.evaluate import RESULT_COLUMNS, classification_metrics
from biovlm.methods import build_method
from biovlm.train import predict

R = runs.Run
QUIET = {"echo": lambda line: None}


@pytest.fixture(scope="module")
def inputs(tiny_backbone):
    return {ds: fake_inputs(ds, tiny_backbone.embed_dim) for ds in DATASETS2}


# ---------------------------------------------------------------------------------------------- plans
def test_run_name_and_plan_order_of_every_setting():
    cfg = {"settings": ["fewshot", "crossdata", "base2new"], "seeds": [2, 1], "datasets": ["a", "b"],
           "fewshot": {"shots": [4, 1]}, "crossdata": {"shots": 8, "sources": ["b", "z"]}, "base2new": {"shots": 2}}
    assert R("base2new", "a", 2, 3).name == "base2new/a/k2_seed3"
    assert runs.plan_runs(cfg) == [
        R("fewshot", "a", 1, 2), R("fewshot", "a", 1, 1), R("fewshot", "a", 4, 2), R("fewshot", "a", 4, 1),
        R("fewshot", "b", 1, 2), R("fewshot", "b", 1, 1), R("fewshot", "b", 4, 2), R("fewshot", "b", 4, 1),
        R("fewshot", "b", 8, 2), R("fewshot", "b", 8, 1),
        R("base2new", "a", 2, 2), R("base2new", "a", 2, 1), R("base2new", "b", 2, 2), R("base2new", "b", 2, 1)]
    # the cross-dataset checkpoints already in the few-shot plan are not planned twice
    cfg["crossdata"]["shots"] = 4
    assert len(runs.plan_runs(cfg)) == 8 + 4
    assert runs.plan_runs({**cfg, "settings": ["base2new"]}) == runs.plan_runs(cfg)[8:]
    assert runs.plan_runs({**cfg, "settings": ["crossdata"]}) == [R("fewshot", "b", 4, 2), R("fewshot", "b", 4, 1)]


def test_method_config_applies_the_methods_own_train_section():
    cfg = {"train": {"epochs": 5, "lr": 0.1}, "cocoop": {"n_ctx": 4, "train": {"lr": 0.01}}, "seeds": [1]}
    assert runs.method_config(cfg, "cocoop") == {"train": {"epochs": 5, "lr": 0.01}, "cocoop": {"n_ctx": 4},
                                                 "seeds": [1]}
    assert cfg["cocoop"] == {"n_ctx": 4, "train": {"lr": 0.01}}  # the caller's config is left alone
    assert runs.method_config(cfg, "coop") == {**cfg, "coop": {}}
    assert runs.method_config({**cfg, "coop": None}, "coop")["coop"] == {}
    assert runs.method_config({**cfg, "coop": {"train": None}}, "coop")["train"] == cfg["train"]


# ---------------------------------------------------------------------------------------------- hashes, files
def test_run_hash_is_the_hash_of_everything_the_run_depends_on():
    cfg = {"train": {"epochs": 5}, "filter": {"keep": 3}, "seeds": [9],
           "coop": {"n_ctx": 4, "train": {"lr": 0.5},
                    "per_run": {"fewshot": {"bloodmnist": {"n_ctx": 2}, "all": {"train": {"epochs": 7}}},
                                "base2new": {"bloodmnist": {"n_ctx": 3}}}},
           "data": {"template": "a photo of a {}.", "class_names": "reference", "attribute_template": "reference",
                    "size": 224}}
    run = R("fewshot", "bloodmnist", 4, 2)
    payload = {"format": 1, "method": "coop", "knobs": {"n_ctx": 2}, "train": {"epochs": 7, "lr": 0.5}, "keep": 3,
               "texts": {"template": "a photo of a {}.", "class_names": "reference", "attribute_template": "reference"},
               "run": {"setting": "fewshot", "dataset": "bloodmnist", "shots": 4, "seed": 2}, "inputs": "in",
               "code": "src"}
    expected = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    assert runs.run_hash("coop", cfg, run, "in", "src") == expected
    assert runs.run_hash("coop", {**cfg, "seeds": [1]}, run, "in", "src") == expected  # other settings: no effect
    # a per-run value of another dataset does not touch this run; another template does
    other = {**cfg, "coop": {**cfg["coop"], "per_run": {**cfg["coop"]["per_run"], "base2new": {}}}}
    assert runs.run_hash("coop", other, run, "in", "src") == expected
    assert runs.run_hash("coop", {**cfg, "data": {**cfg["data"], "template": "{}"}}, run, "in", "src") != expected


def test_code_digest_hashes_every_code_file_by_name_and_bytes():
    root = Path(runs.__file__).resolve().parent
    digest = hashlib.sha256()
    names = []
    for pattern in planning.CODE_FILES:
        for path in sorted(root.glob(pattern)):
            names.append(path.relative_to(root).as_posix())
            digest.update(names[-1].encode() + path.read_bytes())
    methods = sorted(f"methods/{p.name}" for p in (root / "methods").glob("*.py"))
    assert names == ["plan.py", "runs.py", "train.py", "routing.py", "evaluate.py", "prompts.py", "backbone.py",
                     "filtering.py", "sampling.py", *methods]
    assert planning.code_digest() == digest.hexdigest()


def test_file_digest_is_the_sha256_of_the_bytes(tmp_path):
    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert runs.file_digest(tmp_path / "f") == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_atomic_save_writes_through_a_hidden_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "new" / "folder" / "run.pt"
    saved_to = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: (saved_to.append(Path(f.name)), real_save(obj, f)))
    runs.atomic_save({"hash": "a"}, target)
    runs.atomic_save({"hash": "b"}, target)  # into the existing folder, over the existing file
    assert saved_to == [tmp_path / "new" / "folder" / f".run.pt.{os.getpid()}.tmp"] * 2
    assert sorted(p.name for p in target.parent.iterdir()) == ["run.pt"]
    assert runs.load_if_current(target, "b") == {"hash": "b"}


FIX = "free space there or point that folder to a larger disk"


@pytest.mark.parametrize("error", [  # what torch.save raises when the disk fills mid-write
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
    OSError(errno.ENOSPC, "No space left on device")])
def test_atomic_save_on_a_full_disk_keeps_the_previous_checkpoint(tmp_path, disk, monkeypatch, error):
    target = tmp_path / "fewshot" / "breastmnist" / "k1_seed1.pt"
    runs.atomic_save({"hash": "before", "t": torch.ones(3)}, target)
    before = target.read_bytes()
    state = {"hash": "new", "t": torch.zeros(250_000)}  # 1 MB
    needed = 1_000_000 + storage.MARGIN_BYTES + storage.MARGIN_PER_ARRAY
    disk.free = needed - 1
    message = (f"not enough disk space in {target.parent}: writing k1_seed1.pt needs {needed:,} bytes (2.0 MB), "
               f"only {needed - 1:,} bytes (2.0 MB) free; {FIX}")
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$"):
        runs.atomic_save(state, target)  # checked first: nothing written

    def fails_midway(obj, f):
        f.write(b"PK\3\4" + b"\0" * 60)
        disk.free = 64
        raise error

    disk.free = needed
    monkeypatch.setattr(torch, "save", fails_midway)
    message = (f"not enough disk space in {target.parent}: writing k1_seed1.pt needs {needed:,} bytes (2.0 MB), "
               f"only 64 bytes free; {FIX}")
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$"):
        runs.atomic_save(state, target)
    assert target.read_bytes() == before and os.listdir(target.parent) == ["k1_seed1.pt"]
    assert runs.load_if_current(target, "before") is not None


class _Pickled:
    """A class ``torch.load(weights_only=True)`` refuses."""


def test_load_if_current_refuses_what_is_not_a_current_run_file(tmp_path):
    path = tmp_path / "run.pt"
    assert runs.load_if_current(path, "h") is None
    for obj in ({"hash": "h", "x": _Pickled()}, ["h"], {"rows": []}):
        torch.save(obj, path)
        assert runs.load_if_current(path, "h") is None, obj
    torch.save({"hash": "h", "t": torch.ones(2)}, path)
    assert torch.equal(runs.load_if_current(path, "h")["t"], torch.ones(2))


# ---------------------------------------------------------------------------------------------- inputs
def test_attributes_for_a_run(inputs):
    data = inputs["bloodmnist"]
    every = data.table.attributes
    shots = data.features.shots(1, 2)
    assert runs.DatasetInputs(data.info, data.features, None, "d").attributes_for("coop", [0, 1], shots, 2) is None
    assert data.attributes_for("zeroshot_attr", range(8), shots, 1) == every  # static: sees no labels
    assert data.attributes_for("biovlm", range(8), None, 1) == every
    assert data.attributes_for("biovlm", [0, 1, 2], shots, 2) == data.table.select(shots, [0, 1, 2], 2)
    assert data.attributes_for("biovlm", [0, 1, 2], shots, 2) != every


def test_expected_feature_meta():
    cfg = {"backbone": {"name": "tiny"}, "data": {"size": 28}, "features": {"views": 3, "normalize": "backbone",
                                                                             "crop_scale": [0.5, 1]}}
    assert runs.expected_feature_meta(cfg, "x") == {
        "dataset": "x", "backbone": "tiny", "size": 28, "views": 3,
        "transform": {"normalize": "backbone", "crop_scale": [0.5, 1.0], "jitter_p": 0.8, "blur_p": 0.5,
                      "blur_kernel": 3}}


@pytest.fixture(scope="module")
def input_files(tiny_backbone, synthetic_root, tmp_path_factory):
    """Real feature files and confidence tables of DATASETS2 (seed 1, K up to 4, one view)."""
    from biovlm.features import extract_features, load_features
    from biovlm.filtering import build_table, save_table

    folder = tmp_path_factory.mktemp("inputs")
    (folder / "filtered").mkdir()
    for ds in DATASETS2:
        path = extract_features(ds, tiny_backbone, root=synthetic_root, size=28, views=1, seeds=[1], max_shots=4,
                                batch_size=128,
                                out=folder / "features" / f"{ds}.safetensors", transform=demo_transform())
        info = get_dataset(ds)
        save_table(build_table(info, [["a", "b"]] * info.n_classes, tiny_backbone, load_features(path)),
                   folder / "filtered" / f"{ds}.json")
    return folder


def input_config(**overrides):
    return small_config(**{"datasets": DATASETS2, "seeds": [1], "backbone.name": "tiny", "features.views": 1,
                           **overrides})


def copy_inputs(src: Path, dest: Path) -> tuple[Path, Path]:
    shutil.copytree(src, dest)
    return dest / "features", dest / "filtered"


def test_load_inputs_reads_and_digests_every_file(input_files):
    feats, filtered = input_files / "features", input_files / "filtered"
    loaded = runs.load_inputs(input_config(), feats, filtered)
    assert list(loaded) == DATASETS2
    for ds, data in loaded.items():
        f_hash = hashlib.sha256((feats / f"{ds}.safetensors").read_bytes()).hexdigest()
        t_hash = hashlib.sha256((filtered / f"{ds}.json").read_bytes()).hexdigest()
        assert data.digest == hashlib.sha256((f_hash + t_hash).encode()).hexdigest()
        assert data.info.name == ds and data.table.attributes == [["a", "b"]] * data.info.n_classes
        assert np.array_equal(data.table.pool_indices, data.features.pool_indices)
    only = runs.load_inputs(input_config(), feats, None, datasets=["bloodmnist"])
    assert list(only) == ["bloodmnist"] and only["bloodmnist"].table is None
    assert only["bloodmnist"].digest == hashlib.sha256((feats / "bloodmnist.safetensors").read_bytes()).hexdigest()
    # K = 4 is exactly what the files hold
    assert runs.load_inputs(input_config(**{"fewshot.shots": [4]}), feats, filtered)


def test_missing_input_files_are_named_with_the_stage_to_rerun(input_files, tmp_path):
    feats, filtered = copy_inputs(input_files, tmp_path / "in")
    cfg = input_config()
    (feats / "breastmnist.safetensors").unlink()
    (feats / "bloodmnist.safetensors").unlink()
    message = (f"feature file(s) {feats / 'breastmnist.safetensors'}, {feats / 'bloodmnist.safetensors'} missing; "
               "run the features stage first (dvc repro features)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    shutil.copy(input_files / "features" / "breastmnist.safetensors", feats)
    message = (f"feature file(s) {feats / 'bloodmnist.safetensors'} missing; run the features stage first "
               "(dvc repro features)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    shutil.copy(input_files / "features" / "bloodmnist.safetensors", feats)
    (filtered / "bloodmnist.json").unlink()
    message = (f"confidence table(s) {filtered / 'bloodmnist.json'} missing; run the filter stage first "
               "(dvc repro filter)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    (filtered / "breastmnist.json").unlink()
    message = (f"confidence table(s) {filtered / 'breastmnist.json'}, {filtered / 'bloodmnist.json'} missing; run "
               "the filter stage first (dvc repro filter)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    assert list(runs.load_inputs(cfg, feats, None)) == DATASETS2  # no tables asked for


def test_mismatched_feature_files_are_named_exactly(input_files):
    from biovlm.features import load_features

    feats, filtered = input_files / "features", input_files / "filtered"
    path = feats / "breastmnist.safetensors"
    with pytest.raises(ValueError) as reason:
        load_features(path, expect={"dataset": "breastmnist", "backbone": "tiny", "size": 28, "views": 2})
    message = f"{path} does not match params.yaml ({reason.value}); rerun the features stage (dvc repro features)"
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(input_config(**{"features.views": 2}), feats, filtered)
    message = (f"{path} holds shots for seeds [1] up to K=4, but params.yaml asks for seeds [1, 2] and K up to 4; "
               "rerun the features stage (dvc repro features)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(input_config(seeds=[1, 2]), feats, filtered)
    message = (f"{path} holds shots for seeds [1] up to K=4, but params.yaml asks for seeds [1] and K up to 8; "
               "rerun the features stage (dvc repro features)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(input_config(**{"fewshot.shots": [1, 8], "features.max_shots": 8}), feats, filtered)


def test_mismatched_confidence_tables_are_named_exactly(input_files, tmp_path):
    from biovlm.filtering import ConfidenceTable, load_table, save_table

    feats, filtered = copy_inputs(input_files, tmp_path / "in")
    cfg = input_config()
    fpath, path = filtered / "bloodmnist.json", feats / "bloodmnist.safetensors"
    table = load_table(fpath)
    save_table(ConfidenceTable(**{**vars(table), "attributes": table.attributes[:3]}), fpath)
    message = f"{fpath} holds attributes for 3 classes, bloodmnist has 8; rerun the attributes and filter stages"
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    save_table(ConfidenceTable(**{**vars(table), "pool_indices": table.pool_indices + 1}), fpath)
    message = f"{fpath} scores other pool images than {path}; rerun the filter stage (dvc repro filter)"
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    save_table(ConfidenceTable(**{**vars(table), "attribute_template": "reference"}), fpath)
    message = (f"{fpath} was built with data.attribute_template 'reference', params.yaml asks for 'project'; rerun "
               f"the filter stage (dvc repro filter)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(cfg, feats, filtered)
    for record in ({"format": 1}, {"format": 3}):  # an older table, a damaged one
        fpath.write_text(json.dumps(record))
        with pytest.raises((ValueError, KeyError)) as reason:
            load_table(fpath)
        message = f"{fpath} is not a confidence table of this version ({reason.value}); rerun the filter stage " \
                  "(dvc repro filter)"
        with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
            runs.load_inputs(cfg, feats, filtered)


# ---------------------------------------------------------------------------------------------- methods
def test_static_and_class_specific_methods():
    """Static: learns nothing from the shots (untrained, no setup), so its rows are shared between runs."""
    static = {"zeroshot": True, "zeroshot_attr": True, "coop": False, "cocoop": False, "kgcoop": False,
              "biomedcoop": False, "clip_adapter": False, "linear_probe": False, "biovlm": False}
    assert {name: runs.is_static(name) for name in static} == static
    assert [name for name in static if runs.class_specific(name)] == ["linear_probe"]
    assert runs.class_specific("linear_probe") is True and runs.class_specific("coop") is False


def test_shared_text_features_encode_each_text_list_once():
    calls = []

    def encode(texts, batch_size=7):
        calls.append((texts, batch_size))
        return torch.tensor([[float(len(t))] for t in texts])

    backbone = SimpleNamespace(encode_texts=encode)
    runs.share_text_features(backbone)
    wrapped = backbone.encode_texts
    runs.share_text_features(backbone)  # a second call keeps the first memo
    assert backbone.encode_texts is wrapped and backbone._biovlm_shared_texts is True
    first = backbone.encode_texts(("a", "bb"))
    first += 100  # a caller changing its copy does not change the memo
    again = backbone.encode_texts(["a", "bb"], batch_size=3)
    assert again.tolist() == [[1.0], [2.0]]
    assert backbone.encode_texts(["ccc"], 5).tolist() == [[3.0]]
    assert calls == [(["a", "bb"], 256), (["ccc"], 5)]


# ---------------------------------------------------------------------------------------------- one run
def test_evaluate_part_equals_metrics_of_predict_on_hand_remapped_labels(tiny_backbone, inputs):
    data = inputs["bloodmnist"]
    method = build_method("zeroshot_attr", tiny_backbone, {}, data.info, attributes=data.table.attributes)
    ids = [7, 2, 5]  # not sorted, the last class among them
    labels = data.features.test_labels.numpy()
    rows = [i for i, y in enumerate(labels) if y in ids]
    y = np.array([ids.index(labels[i]) for i in rows])
    attrs = [data.table.attributes[c] for c in ids]
    probs = predict(method, data.features.test_features[rows], [data.info.prompt_names[c] for c in ids], data.info,
                    attrs).numpy()
    got = runs.evaluate_part(method, data, ids, batch_size=4, attributes=data.table.attributes)
    assert got == {**classification_metrics(probs, y), "n_classes": 3}
    assert got["n"] == len(rows) == 12
    # the method reads the attributes it is given, by label id
    shuffled = data.table.attributes[::-1]
    assert runs.evaluate_part(method, data, ids, attributes=shuffled) != got
    trivial = runs.evaluate_part(method, data, [3], trivial=True)
    expected = {**classification_metrics(np.ones((4, 1)), np.zeros(4, dtype=int)), "n_classes": 1}
    assert trivial == pytest.approx(expected, nan_ok=True) and trivial["accuracy"] == 100.0


def test_zero_shot_through_the_run_path_equals_a_direct_evaluation(tiny_backbone, inputs):
    cfg, data = small_config(), inputs["bloodmnist"]
    state = runs.train_and_evaluate("zeroshot", cfg, tiny_backbone, data, R("fewshot", "bloodmnist", 4, 1))
    method = build_method("zeroshot", tiny_backbone, {}, data.info)
    probs = predict(method, data.features.test_features, list(data.info.prompt_names), data.info).numpy()
    metrics = classification_metrics(probs, data.features.test_labels.numpy())
    assert state["rows"] == [{"method": "zeroshot", "setting": "fewshot", "source": "bloodmnist",
                              "target": "bloodmnist", "shots": 4, "seed": 1, "part": "all", "n_classes": 8,
                              **metrics}]
    assert state["history"] == {"epochs": [], "steps": 0, "seconds": 0.0}
    assert list(state["rows"][0]) == [c for c in RESULT_COLUMNS if c in state["rows"][0]]


def test_base2new_evaluates_base_and_novel_classes_apart(tiny_backbone, inputs):
    cfg, data = small_config(), inputs["bloodmnist"]
    state = runs.train_and_evaluate("zeroshot", cfg, tiny_backbone, data, R("base2new", "bloodmnist", 4, 2))
    method = build_method("zeroshot", tiny_backbone, {}, data.info)
    assert [(r["part"], r["n_classes"], r["seed"], r["setting"]) for r in state["rows"]] == [
        ("base", 4, 2, "base2new"), ("novel", 4, 2, "base2new")]
    for row, ids in zip(state["rows"], ([0, 1, 2, 3], [4, 5, 6, 7]), strict=True):
        expected = runs.evaluate_part(method, data, ids)
        assert {k: row[k] for k in expected} == expected
    probe = runs.train_and_evaluate("linear_probe", cfg, tiny_backbone, data, R("base2new", "bloodmnist", 4, 2))
    assert [r["part"] for r in probe["rows"]] == ["base"]  # no classifier for the novel classes


def test_a_single_training_class_trains_nothing(tiny_backbone, inputs):
    cfg, data = small_config(), inputs["breastmnist"]
    state = runs.train_and_evaluate("coop", cfg, tiny_backbone, data, R("base2new", "breastmnist", 4, 1))
    assert state["history"] == {"epochs": [], "steps": 0, "seconds": 0.0,
                                "skipped": "one training class: every prediction is that class"}
    assert [(r["part"], r["accuracy"], r["n_classes"]) for r in state["rows"]] == [("base", 100.0, 1),
                                                                                  ("novel", 100.0, 1)]
    # the one class keeps every attribute (nothing to rank against); two classes are trained and filtered
    one = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, data, R("base2new", "breastmnist", 4, 1))
    assert one["checkpoint"]["meta"]["attributes"] == data.table.attributes[:1]
    two = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, data, R("fewshot", "breastmnist", 4, 1))
    assert two["checkpoint"]["meta"]["attributes"] == data.table.select(data.features.shots(1, 4), [0, 1], 2)
    assert len(data.table.attributes[0]) == 3 and len(two["history"]["epochs"]) == cfg["train"]["epochs"]


def test_trained_runs_follow_the_train_knobs_and_differ_across_seeds(tiny_backbone, inputs):
    cfg, data = small_config(**{"train.epochs": 3}), inputs["bloodmnist"]
    one = runs.train_and_evaluate("coop", cfg, tiny_backbone, data, R("fewshot", "bloodmnist", 4, 1))
    two = runs.train_and_evaluate("coop", cfg, tiny_backbone, data, R("fewshot", "bloodmnist", 4, 2))
    assert [r["epoch"] for r in one["history"]["epochs"]] == [0, 1, 2]
    assert one["history"]["steps"] == 3 * 4  # 32 shots, batches of 8
    assert one["rows"][0]["ece"] != two["rows"][0]["ece"]
    assert not torch.equal(one["checkpoint"]["tensors"]["ctx"], two["checkpoint"]["tensors"]["ctx"])
    method = build_method("coop", tiny_backbone, cfg, data.info)
    method.load_checkpoint(one["checkpoint"])
    assert one["rows"][0] == {**one["rows"][0], **runs.evaluate_part(method, data, range(8))}


def test_memo_reuses_the_metrics_of_a_class_list(tiny_backbone, inputs):
    cfg, data = small_config(), inputs["bloodmnist"]
    memo = {("bloodmnist", tuple(range(8))): {"accuracy": -1.0, "n": 0, "n_classes": 8}}
    state = runs.train_and_evaluate("zeroshot", cfg, tiny_backbone, data, R("fewshot", "bloodmnist", 1, 1), memo=memo)
    assert state["rows"][0]["accuracy"] == -1.0
    memo = {}
    state = runs.train_and_evaluate("zeroshot", cfg, tiny_backbone, data, R("base2new", "bloodmnist", 4, 1), memo=memo)
    assert list(memo) == [("bloodmnist", (0, 1, 2, 3)), ("bloodmnist", (4, 5, 6, 7))]
    for row, metrics in zip(state["rows"], memo.values(), strict=True):
        assert metrics["n_classes"] == 4 and row == {**row, **metrics}


def test_cross_evaluate_tests_the_checkpoint_on_every_other_dataset(tiny_backbone, inputs, monkeypatch):
    cfg = small_config()
    run = R("fewshot", "bloodmnist", 4, 1)
    saved = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, inputs["bloodmnist"], run)
    rows = runs.cross_evaluate("biovlm", cfg, tiny_backbone, saved, "bloodmnist", run, inputs)
    method = build_method("biovlm", tiny_backbone, cfg, inputs["bloodmnist"].info,
                          attributes=saved["checkpoint"]["meta"]["attributes"])
    method.load_checkpoint(saved["checkpoint"])
    other = runs.evaluate_part(method, inputs["breastmnist"], [0, 1], attributes=inputs["breastmnist"].table.attributes)
    assert rows == [{"method": "biovlm", "setting": "crossdata", "source": "bloodmnist", "target": "breastmnist",
                     "shots": 4, "seed": 1, "part": "all", **other},
                    {**saved["rows"][0], "setting": "crossdata"}]
    # a method reading attributes at test time gets the target's (every attribute: label-free)
    za = runs.train_and_evaluate("zeroshot_attr", cfg, tiny_backbone, inputs["bloodmnist"], run)
    target = inputs["breastmnist"]
    method = build_method("zeroshot_attr", tiny_backbone, cfg, target.info, attributes=target.table.attributes)
    expected = runs.evaluate_part(method, target, [0, 1], attributes=target.table.attributes)
    assert expected != runs.evaluate_part(method, target, [0, 1], attributes=target.table.attributes[::-1])
    rows = runs.cross_evaluate("zeroshot_attr", cfg, tiny_backbone, za, "bloodmnist", run, inputs)
    assert rows[0] == {**rows[0], **expected}
    memo = {("breastmnist", (0, 1)): {"accuracy": -1.0}}
    zs = runs.train_and_evaluate("zeroshot", cfg, tiny_backbone, inputs["bloodmnist"], run)
    rows = runs.cross_evaluate("zeroshot", cfg, tiny_backbone, zs, "bloodmnist", run, inputs, memo)
    assert rows[0]["accuracy"] == -1.0 and list(memo) == [("breastmnist", (0, 1))]
    memo = {}
    rows = runs.cross_evaluate("zeroshot", cfg, tiny_backbone, zs, "bloodmnist", run, inputs, memo)
    assert memo == {("breastmnist", (0, 1)): {k: rows[0][k] for k in memo[("breastmnist", (0, 1))]}}
    assert runs.cross_evaluate("linear_probe", cfg, tiny_backbone, saved, "bloodmnist", run, inputs) == []

    def not_transferable(*args, **kwargs):
        from biovlm.methods import NotTransferable

        raise NotTransferable("no")

    monkeypatch.setattr(runs, "evaluate_part", not_transferable)
    assert runs.cross_evaluate("biovlm", cfg, tiny_backbone, saved, "bloodmnist", run, inputs) == []


def test_run_method_reports_saves_reuses_and_prunes(tiny_backbone, inputs, tmp_path):
    cfg = small_config(settings=["fewshot", "crossdata"], **{"crossdata.sources": ["bloodmnist"]})
    out = tmp_path / "zs"
    stale = out / "fewshot" / "old" / "k9_seed9.pt"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    (out / "notes.txt").write_text("kept")
    lines: list[str] = []
    start = time.perf_counter()
    df = runs.run_method("zeroshot", cfg, tiny_backbone, inputs, out, echo=lines.append)
    elapsed = time.perf_counter() - start
    reported = [float(t) for line in lines for t in re.findall(r"(\d+\.\d) s\)?$", line)]
    assert len(reported) == 9 and max(reported) <= elapsed + 0.05  # durations of this call, not clock readings
    plan = runs.plan_runs(cfg)
    assert len(plan) == 8
    for i, (run, line) in enumerate(zip(plan, lines, strict=False), 1):
        acc = df[(df.setting == "fewshot") & (df.target == run.dataset) & (df.shots == run.shots)
                 & (df.seed == run.seed)].accuracy.item()
        assert re.fullmatch(rf"\[{i}/8\] zeroshot {run.name}: accuracy all {acc:.1f} \(\d+\.\d s\)", line), line
    done = r"zeroshot: 8 runs \(8 trained, 0 reused, 0 of them from the run store\) in \d+\.\d s"
    assert re.fullmatch(done, lines[8])
    assert lines[9] == "zeroshot crossdata: 4 rows"
    assert len(lines) == 10
    assert not stale.exists() and not (out / "fewshot" / "old").exists() and (out / "notes.txt").exists()
    runs.prune(tmp_path / "never-written", set())  # no folder: nothing to prune

    code = planning.code_digest()
    for run in plan:
        state = torch.load(out / f"{run.name}.pt", weights_only=True)
        assert state["hash"] == runs.run_hash("zeroshot", cfg, run, inputs[run.dataset].digest, code)
        assert state["run"] == {"setting": "fewshot", "dataset": run.dataset, "shots": run.shots, "seed": run.seed}
        assert state["method"] == "zeroshot"
    all_inputs = hashlib.sha256("".join(inputs[d].digest for d in inputs).encode()).hexdigest()
    for seed in (1, 2):
        run = R("fewshot", "bloodmnist", 4, seed)
        expected = hashlib.sha256(f"{runs.run_hash('zeroshot', cfg, run, inputs['bloodmnist'].digest, code)}:"
                                  f"{all_inputs}:{DATASETS2}".encode()).hexdigest()
        saved = torch.load(out / "crossdata" / "bloodmnist" / f"k4_seed{seed}.pt", weights_only=True)
        assert saved["hash"] == expected
    # a static method's rows do not depend on K or the seed
    few = df[df.setting == "fewshot"]
    assert few.groupby("target").accuracy.nunique().tolist() == [1, 1]
    assert few.groupby("target").ece.nunique().tolist() == [1, 1]

    lines.clear()
    again = runs.run_method("zeroshot", cfg, tiny_backbone, inputs, out, echo=lines.append)
    assert again.equals(df)
    first = df[(df.target == "breastmnist") & (df.shots == 1) & (df.seed == 1)].accuracy.item()
    assert lines[0] == f"[1/8] zeroshot {plan[0].name}: accuracy all {first:.1f} (done before, reused)"
    done = r"zeroshot: 8 runs \(0 trained, 8 reused, 0 of them from the run store\) in \d+\.\d s"
    assert re.fullmatch(done, lines[-2])
    # fewer settings: the crossdata files go, their rows too
    fewer = runs.run_method("zeroshot", small_config(settings=["fewshot"]), tiny_backbone, inputs, out, **QUIET)
    assert set(fewer.setting) == {"fewshot"} and not (out / "crossdata").exists()


def test_run_method_removes_the_temporary_files_of_a_killed_run(tiny_backbone, inputs, tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    out = tmp_path / "zs"
    killed = out / "fewshot" / "breastmnist" / f".k1_seed1.pt.{child.pid}.tmp"
    running = out / "fewshot" / "breastmnist" / f".k2_seed1.pt.{os.getppid()}.tmp"  # another train process's
    killed.parent.mkdir(parents=True)
    killed.write_bytes(b"PK\3\4")
    running.write_bytes(b"PK\3\4")
    lines: list[str] = []
    runs.run_method("zeroshot", small_config(settings=["fewshot"]), tiny_backbone, inputs, out, echo=lines.append)
    assert lines[0] == f"zeroshot: removed 1 temporary file(s) left by an interrupted run: {killed}"
    assert not killed.exists() and running.exists()
    assert {p.name for p in killed.parent.iterdir()} == {"k1_seed1.pt", "k1_seed2.pt", "k4_seed1.pt", "k4_seed2.pt",
                                                          running.name}


def test_a_damaged_feature_file_is_named_before_training(input_files, tmp_path):
    feats, filtered = copy_inputs(input_files, tmp_path / "in")
    path = feats / "bloodmnist.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    message = (f"{path} is damaged (safetensors: Error while deserializing header: incomplete metadata, file not "
               f"fully covered); rerun the features stage (dvc repro features)")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(input_config(), feats, filtered)


def test_trained_runs_through_run_method_differ_across_seeds(tiny_backbone, inputs, tmp_path):
    cfg = small_config(settings=["fewshot"], datasets=["bloodmnist"], **{"fewshot.shots": [4]})
    df = runs.run_method("coop", cfg, tiny_backbone, {"bloodmnist": inputs["bloodmnist"]}, tmp_path, **QUIET)
    assert df.seed.tolist() == [1, 2]
    assert df.ece[0] != df.ece[1]


def test_results_frame_orders_by_setting_then_cells():
    def row(setting, source, shots, seed, part="all"):
        return {"method": "m", "setting": setting, "source": source, "target": source, "shots": shots, "seed": seed,
                "part": part, "accuracy": 1.0}

    rows = [row("crossdata", "a", 4, 1), row("base2new", "a", 4, 1, "novel"), row("base2new", "a", 4, 1, "base"),
            row("fewshot", "b", 1, 1), row("fewshot", "a", 4, 2), row("fewshot", "a", 4, 1), row("fewshot", "a", 1, 2)]
    frame = runs.results_frame(rows)
    assert list(frame.columns) == list(RESULT_COLUMNS) and list(frame.index) == list(range(7))
    assert [(r.setting, r.source, r.shots, r.seed, r.part) for r in frame.itertuples()] == [
        ("fewshot", "a", 1, 2, "all"), ("fewshot", "a", 4, 1, "all"), ("fewshot", "a", 4, 2, "all"),
        ("fewshot", "b", 1, 1, "all"), ("base2new", "a", 4, 1, "base"), ("base2new", "a", 4, 1, "novel"),
        ("crossdata", "a", 4, 1, "all")]


def test_a_diverging_run_is_named_by_dataset_k_and_seed(tiny_backbone, inputs, monkeypatch):
    from biovlm.methods.coop import CoOp
    from biovlm.train import NonFiniteLossError

    def diverging(self, batch):
        loss = (self.ctx * float("nan")).sum()
        return loss, {"loss": float("nan"), "acc": 0.0}

    monkeypatch.setattr(CoOp, "loss", diverging)
    cfg = small_config()
    with pytest.raises(NonFiniteLossError, match=r"^fewshot/bloodmnist/k4_seed2: coop: loss term\(s\) 'loss' became "):
        runs.train_and_evaluate("coop", cfg, tiny_backbone, inputs["bloodmnist"], R("fewshot", "bloodmnist", 4, 2))


def test_run_method_logs_every_epoch_and_says_which_runs_came_from_the_store(tiny_backbone, inputs, tmp_path):
    """The per-epoch log (dvclive, in the train stage) receives each run's name, epoch record and epoch; a run whose
    file is gone but whose result the run store holds is reused from the store, and its line says so."""
    from biovlm.store import RunStore

    cfg = small_config(settings=["fewshot"], datasets=["bloodmnist"], seeds=[1], **{"fewshot.shots": [1, 4]})
    one = {"bloodmnist": inputs["bloodmnist"]}
    store, out = RunStore(tmp_path / "store", **QUIET), tmp_path / "coop"
    logged: list[tuple[str, int, dict]] = []
    df = runs.run_method("coop", cfg, tiny_backbone, one, out, log=lambda name, record, epoch: logged.append(
        (name, epoch, record)), store=store, **QUIET)
    names = [run.name for run in runs.plan_runs(cfg)]
    assert [(name, epoch) for name, epoch, _ in logged] == [(n, e) for n in names for e in (0, 1)]
    assert all(record["epoch"] == epoch and {"loss", "ce", "acc", "lr"} <= set(record)
               for _, epoch, record in logged)

    (out / f"{names[0]}.pt").unlink()  # DVC restored an older output, say: the store still has the result
    lines: list[str] = []
    again = runs.run_method("coop", cfg, tiny_backbone, one, out, store=store, echo=lines.append)
    assert again.equals(df) and (out / f"{names[0]}.pt").exists()
    acc = df[(df.shots == 1)].accuracy.item()
    assert lines[0] == f"[1/2] coop {names[0]}: accuracy all {acc:.1f} (reused from the run store)"
    assert lines[1].endswith("(done before, reused)")
    assert re.fullmatch(r"coop: 2 runs \(0 trained, 2 reused, 1 of them from the run store\) in \d+\.\d s", lines[2])


def test_output_state_drops_only_the_wall_time():
    """A run file holds no wall time (the same run writes the same bytes in every process); nothing else goes."""
    state = {"hash": "h", "rows": [{"accuracy": 1.0}], "history": {"epochs": [{"loss": 0.5}], "steps": 4,
                                                                   "seconds": 1.25}}
    assert runs.output_state(state) == {"hash": "h", "rows": [{"accuracy": 1.0}],
                                        "history": {"epochs": [{"loss": 0.5}], "steps": 4}}
    assert state["history"]["seconds"] == 1.25  # the run store's copy keeps it
    static = {"hash": "h", "rows": []}  # a static method's run has no history
    assert runs.output_state(static) == static and "history" not in runs.output_state(static)
    assert runs.output_state({"history": None}) == {"history": {}}


def test_image_record_is_what_predict_needs_from_the_feature_file():
    meta = {"size": 28, "transform": {"normalize": "backbone"}, "backbone": "tiny", "weights_sha256": "d92f",
            "views": 2, "dataset": "bloodmnist"}
    data = SimpleNamespace(features=SimpleNamespace(meta=meta))
    assert runs.image_record(data) == {"size": 28, "transform": {"normalize": "backbone"}, "backbone": "tiny",
                                       "weights_sha256": "d92f"}
    assert runs.image_record(SimpleNamespace(features=SimpleNamespace(meta={"size": 64}))) == {"size": 64}
    assert runs.image_record(SimpleNamespace(features=object())) == {}  # a stand-in without a record
