from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from biovlm import storage
from biovlm.data import load_split
from biovlm.features import FeatureFileError, extract_features, load_features, read_meta
from biovlm.sampling import few_shot_indices


@pytest.fixture(scope="module")
def feature_file(synthetic_root, tiny_backbone, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "bloodmnist.safetensors"
    return extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=2, seeds=[1, 2],
                            max_shots=4, batch_size=50, out=out, seed=0)


def test_file_holds_every_part_with_the_right_shapes(feature_file, synthetic_root, tiny_backbone):
    fs = load_features(feature_file)
    d = tiny_backbone.embed_dim
    _, train_labels = load_split("bloodmnist", "train", 28, synthetic_root)
    pool = np.union1d(few_shot_indices(train_labels, 4, 1), few_shot_indices(train_labels, 4, 2))
    assert fs.test_features.shape == (88, d) and fs.test_labels.shape == (88,)
    assert fs.val_features.shape == (len(fs.val_labels), d) and np.bincount(fs.val_labels).min() >= 4
    assert np.array_equal(fs.pool_indices, pool)
    assert fs.pool_clean.shape == (len(pool), d)
    assert {k: tuple(v.shape) for k, v in fs.pool_views.items()} == {f: (len(pool), 2, d) for f in
                                                                      ("plain", "weak", "strong")}
    assert torch.allclose(fs.pool_clean.norm(dim=-1), torch.ones(len(pool)), atol=1e-3)
    assert fs.meta == {"format": 4, "dataset": "bloodmnist", "backbone": "tiny", "size": 28, "views": 2,
                       "seeds": [1, 2], "max_shots": 4, "embed_dim": d, "n_classes": 8, "seed": 0,
                       "weights_sha256": tiny_backbone.fingerprint,
                       "transform": {"normalize": "imagenet", "crop_scale": [0.08, 1.0], "jitter_p": 0.8,
                                     "blur_p": 0.5, "blur_kernel": 3}}


def test_cached_features_equal_direct_computation(feature_file, synthetic_root, tiny_backbone):
    fs = load_features(feature_file)
    images, labels = load_split("bloodmnist", "test", 28, synthetic_root)
    def imagenet(images):  # the default normalisation: torchvision's ImageNet mean/std, as the public code
        x = tiny_backbone.resize(tiny_backbone.images_to_unit(images))
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        return tiny_backbone.encode_images((x - mean) / std)

    direct = imagenet(images[:20])
    torch.testing.assert_close(fs.test_features[:20], direct, atol=2e-3, rtol=0)  # stored as float16
    assert np.array_equal(fs.test_labels.numpy(), labels)
    train_images, _ = load_split("bloodmnist", "train", 28, synthetic_root)
    clean = imagenet(train_images[fs.pool_indices[:5]])
    torch.testing.assert_close(fs.pool_clean[:5], clean, atol=1e-5, rtol=0)
    own = tiny_backbone.encode_images(tiny_backbone.prepare_images(train_images[fs.pool_indices[:5]]))
    assert (fs.pool_clean[:5] - own).abs().max() > 1e-3  # the backbone's own mean/std would give other features


def test_views_are_augmented_and_reproducible(feature_file, synthetic_root, tiny_backbone, tmp_path):
    fs = load_features(feature_file)
    distance = {f: (v[:, 0] - fs.pool_clean).norm(dim=-1).mean().item() for f, v in fs.pool_views.items()}
    assert 0 < distance["weak"] < distance["strong"]  # flips move features a little, jitter and blur more
    assert not torch.equal(fs.pool_views["plain"][:, 0], fs.pool_views["plain"][:, 1])
    again = extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=2, seeds=[1, 2],
                             max_shots=4, batch_size=50, out=tmp_path / "again.safetensors", seed=0)
    assert all(torch.equal(fs.pool_views[f], load_features(again).pool_views[f]) for f in fs.pool_views)


def test_an_images_views_do_not_depend_on_the_other_seeds(feature_file, synthetic_root, tiny_backbone, tmp_path):
    """Views come from generators keyed by (features.seed, image, view): seed 1's images have the same views
    whether the pool is seed 1's shots alone or the union with seed 2's."""
    both = load_features(feature_file)  # seeds [1, 2]
    alone = load_features(extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=2,
                                           seeds=[1], max_shots=4, out=tmp_path / "one.safetensors", seed=0))
    assert len(alone.pool_indices) < len(both.pool_indices)
    rows = np.searchsorted(both.pool_indices, alone.pool_indices)
    assert np.array_equal(both.pool_indices[rows], alone.pool_indices)
    for family in ("plain", "weak", "strong"):
        assert torch.equal(alone.pool_views[family], both.pool_views[family][rows]), family
    assert torch.equal(alone.pool_clean, both.pool_clean[rows])


def test_weak_and_strong_views_augment_the_plain_crop():
    from biovlm.features import view_tuples

    g = torch.Generator().manual_seed(0)
    images = torch.rand(12, 3, 32, 32, generator=g)
    views = view_tuples(images, list(range(500, 512)), view=1, seed=0, size=32)
    for b in range(12):  # weak: the plain crop, maybe flipped; strong: the plain crop flipped, jittered, blurred
        assert torch.equal(views["weak"][b], views["plain"][b]) or torch.equal(views["weak"][b],
                                                                               views["plain"][b].flip(-1))
    assert not torch.allclose(views["plain"], images, atol=0.05)  # cropped and resized
    some = view_tuples(images[3:5], [503, 504], view=1, seed=0, size=32)  # the same images in another batch
    assert all(torch.equal(some[f], views[f][3:5]) for f in views)
    other = view_tuples(images[3:5], [503, 504], view=2, seed=0, size=32)
    assert not torch.equal(other["plain"], some["plain"])


def test_the_transform_knobs_act_on_the_views():
    from biovlm.features import ViewTransform, view_tuples

    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    indices = list(range(16))

    def flipped_or_same(a, b):
        return all(torch.equal(x, y) or torch.equal(x, y.flip(-1)) for x, y in zip(a, b, strict=True))

    whole = ViewTransform(crop_scale=(1.0, 1.0), jitter_p=0.0, blur_p=0.0)  # no crop, no jitter, no blur
    views = view_tuples(images, indices, view=0, seed=0, size=32, transform=whole)
    assert flipped_or_same(views["plain"], images) and flipped_or_same(views["strong"], views["plain"])
    jitter = view_tuples(images, indices, 0, 0, 32, ViewTransform(crop_scale=(1.0, 1.0), jitter_p=1.0, blur_p=0.0))
    assert not any(flipped_or_same([s], [p]) for s, p in zip(jitter["strong"], jitter["plain"], strict=True))
    # the published p 0.8 and 0.5: some strong views are jittered or blurred, and (with p 0.2 x 0.5) a few not
    published = view_tuples(images.repeat(4, 1, 1, 1), list(range(64)), 0, 0, 32, ViewTransform())
    untouched = sum(flipped_or_same([s], [p]) for s, p in zip(published["strong"], published["plain"], strict=True))
    assert 1 <= untouched <= 20  # expected 6.4 of 64
    # the crop scale: a small area zooms in (its pixels differ more from the image than a whole-image crop's)
    small = view_tuples(images, indices, 0, 0, 32, ViewTransform(crop_scale=(0.08, 0.1), jitter_p=0.0, blur_p=0.0))
    assert not flipped_or_same(small["plain"], images)


@pytest.mark.parametrize(("knobs", "message"), [
    ({"normalize": "clip"}, "features.normalize must be one of imagenet, backbone, got 'clip'"),
    ({"crop_scale": (0.5, 0.2)}, "features.crop_scale must be [low, high] with 0 < low <= high <= 1, got [0.5, 0.2]"),
    ({"crop_scale": (0.0, 1.0)}, "features.crop_scale must be [low, high] with 0 < low <= high <= 1, got [0.0, 1.0]"),
    ({"blur_kernel": 4}, "features.blur_kernel must be an odd number of pixels, got 4"),
])
def test_a_bad_transform_is_named(knobs, message):
    from biovlm.features import ViewTransform

    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        ViewTransform(**knobs)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("features.normalize", "clip", "one of imagenet, backbone"),
    ("features.crop_scale", [0.9, 0.1], "[low, high] with 0 < low <= high <= 1 (area fractions)"),
    ("features.crop_scale", 0.5, "[low, high] with 0 < low <= high <= 1 (area fractions)"),
    ("features.jitter_p", 1.5, "a probability in [0, 1]"),
    ("features.blur_p", -0.1, "a probability in [0, 1]"),
    ("features.blur_kernel", 2, "an odd number of pixels"),
])
def test_config_names_a_bad_transform_knob(key, value, expected):
    from conftest import COMMITTED_PARAMS

    from biovlm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"^{re.escape(f'params.yaml: {key} must be {expected}, got {value!r}')}$"):
        load_config(COMMITTED_PARAMS, {key: value})


def test_the_transform_is_recorded_and_a_mismatch_refused(feature_file):
    from biovlm.features import ViewTransform

    assert read_meta(feature_file)["transform"] == ViewTransform().meta()
    other = ViewTransform(normalize="backbone").meta()
    with pytest.raises(ValueError, match=r"made with transform=.*'imagenet'.*but transform=.*'backbone'.*never mixed"):
        load_features(feature_file, expect={"transform": other})


def test_shots_map_nested_sets_into_the_pool(feature_file, synthetic_root):
    fs = load_features(feature_file)
    _, train_labels = load_split("bloodmnist", "train", 28, synthetic_root)
    for seed in (1, 2):
        for k in (1, 4):
            positions = fs.shots(seed, k)
            assert np.array_equal(fs.pool_indices[positions], few_shot_indices(train_labels, k, seed))
    base = fs.shots(1, 4, classes=[0, 1, 2, 3])
    assert fs.pool_labels[base].bincount().tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="not seed 3 with K=4; rerun the features stage"):
        fs.shots(3, 4)
    with pytest.raises(ValueError, match="up to K=4, not seed 1 with K=8"):
        fs.shots(1, 8)


@pytest.mark.parametrize(("key", "value"), [("backbone", "biomedclip"), ("size", 224), ("views", 16)])
def test_mismatched_file_is_refused(feature_file, key, value):
    with pytest.raises(ValueError, match=rf"made with {key}=.*but {key}={value!r} is asked for.*never mixed"):
        load_features(feature_file, expect={key: value})
    assert read_meta(feature_file)[key] != value


def test_missing_file_names_the_stage(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.safetensors is missing; run the features stage"):
        load_features(tmp_path / "nothing.safetensors")


def test_too_few_training_images_fail_before_encoding(synthetic_root, tiny_backbone, tmp_path):
    with pytest.raises(ValueError, match=r"^class 0 has only 33 examples, fewer than the 40 shots asked for; lower "
                                         r"features\.max_shots \(the feature pool holds that many per class; "
                                         r"bloodmnist's train split is smaller\)$"):
        extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=1, seeds=[1],
                         max_shots=40, out=tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ---------------------------------------------------------------------------------------------- failures
FIX = "free space there or point that folder to a larger disk"


@pytest.fixture
def previous(feature_file, tmp_path):
    """A good feature file where the failing call writes: it must survive the failure."""
    out = tmp_path / "bloodmnist.safetensors"
    shutil.copyfile(feature_file, out)
    return out


def test_a_full_disk_fails_before_encoding_and_keeps_the_previous_file(previous, feature_file, synthetic_root,
                                                                       tiny_backbone, tmp_path, disk, monkeypatch):
    from safetensors.torch import load_file

    before = previous.read_bytes()
    needed = storage.estimated_bytes(load_file(feature_file))  # the file this call would write
    disk.free = needed - 1
    monkeypatch.setattr(tiny_backbone, "encode_images", lambda x: pytest.fail("encoded on a full disk"))
    message = (f"not enough disk space in {tmp_path}: writing bloodmnist.safetensors needs {storage.amount(needed)}, "
               f"only {storage.amount(needed - 1)} free; {FIX}")
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$"):
        extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=2, seeds=[1, 2],
                         max_shots=4, batch_size=50, out=previous, seed=0)
    assert previous.read_bytes() == before and os.listdir(tmp_path) == [previous.name]


def test_a_disk_filling_up_mid_write_is_one_clear_error_and_keeps_the_previous_file(
        previous, synthetic_root, tiny_backbone, tmp_path, disk, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    before = previous.read_bytes()
    needed = []

    def save_file(tensors, filename, metadata=None):  # as safetensors fails on a full disk
        needed.append(storage.estimated_bytes(tensors))
        with open(filename, "wb") as f:
            f.write(b"\0" * 100)
        disk.free = 4096
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(storage.DiskFullError) as raised:
        extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=1, seeds=[1], max_shots=1,
                         batch_size=50, out=previous, seed=0)
    assert str(raised.value) == (f"not enough disk space in {tmp_path}: writing bloodmnist.safetensors needs "
                                 f"{storage.amount(needed[0])}, only 4,096 bytes (4.1 kB) free; {FIX}")
    assert previous.read_bytes() == before and os.listdir(tmp_path) == [previous.name]


def test_a_killed_runs_temporary_file_is_removed_by_the_next_run(synthetic_root, tiny_backbone, tmp_path):
    child = subprocess.Popen(["true"])
    child.wait()
    stale = tmp_path / f".bloodmnist.safetensors.{child.pid}.tmp"
    stale.write_bytes(b"\0" * 100)
    out = extract_features("bloodmnist", tiny_backbone, root=synthetic_root, size=28, views=1, seeds=[1],
                           max_shots=1, batch_size=50, out=tmp_path / "bloodmnist.safetensors")
    assert os.listdir(tmp_path) == [out.name]


@pytest.mark.parametrize(("damage", "reason"), [("random bytes", "header too large"),
                                                ("truncated", "incomplete metadata, file not fully covered"),
                                                ("empty", "header too small")])
def test_a_damaged_feature_file_is_named_with_the_stage_to_rerun(feature_file, tmp_path, damage, reason):
    good = feature_file.read_bytes()
    path = tmp_path / "bloodmnist.safetensors"
    path.write_bytes({"random bytes": np.random.default_rng(0).bytes(len(good)), "truncated": good[:-100],
                      "empty": b""}[damage])
    message = (f"{path} is damaged (safetensors: Error while deserializing header: {reason}); rerun the features "
               f"stage (dvc repro features)")
    for read in (read_meta, load_features):
        with pytest.raises(FeatureFileError, match=f"^{re.escape(message)}$"):
            read(path)


def test_the_same_features_are_the_same_bytes_in_every_process(synthetic_root, tmp_path):
    """Run hashes hash the feature file's bytes: two processes writing the same features must write the same file
    (safetensors wrote a multi-key metadata map in a per-process order)."""
    import subprocess
    import sys

    code = ("import sys; from biovlm.backbone import load_backbone; from biovlm.features import extract_features; "
            "extract_features('breastmnist', load_backbone('tiny'), root=sys.argv[1], size=28, views=1, seeds=[1], "
            "max_shots=2, out=sys.argv[2])")
    outs = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for out in outs:
        subprocess.run([sys.executable, "-c", code, str(synthetic_root), str(out)], check=True, cwd=Path.cwd())
    assert outs[0].read_bytes() == outs[1].read_bytes() == outs[2].read_bytes()
    assert read_meta(outs[0])["dataset"] == "breastmnist"
