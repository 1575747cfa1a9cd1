from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import listing

from biovlm import data
from biovlm.data import (
    DATASETS,
    ChecksumError,
    ensure_npz,
    get_dataset,
    iter_batches,
    load_split,
    make_synthetic,
)

BREAST_COUNTS = {"train": (147, 399), "val": (21, 57), "test": (42, 114)}


def test_registry_matches_medmnist_info():
    import medmnist

    assert list(DATASETS) == [
        "pathmnist", "dermamnist", "octmnist", "pneumoniamnist", "retinamnist", "breastmnist",
        "bloodmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist",
    ]
    for name, info in DATASETS.items():
        official = medmnist.INFO[name]
        assert info.classes == tuple(official["label"][str(i)] for i in range(len(official["label"])))
        assert info.n_channels == official["n_channels"]
        assert info.task == official["task"]
        assert info.modality and info.n_classes == len(official["label"])


def test_retina_grades_read_as_sentences():
    assert get_dataset("retinamnist").prompt_names[2] == "diabetic retinopathy grade 2"
    assert get_dataset("breastmnist").prompt_names == ("malignant", "normal, benign")


@pytest.mark.parametrize("name", ["chestmnist", "nodulemnist3d", "pathmnst"])
def test_unknown_or_multilabel_dataset_is_refused(name):
    with pytest.raises(ValueError, match="valid names: pathmnist, dermamnist") as error:
        get_dataset(name)
    if name == "chestmnist":
        assert "multi-label" in str(error.value)


@pytest.mark.parametrize("size", [28, 64])
def test_official_breastmnist_loads_with_published_counts(official_breastmnist, size):
    for split, (malignant, benign) in BREAST_COUNTS.items():
        images, labels = load_split("breastmnist", split, size=size, root=official_breastmnist)
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        assert images.shape == (malignant + benign, size, size)
        assert np.bincount(labels).tolist() == [malignant, benign]
        assert isinstance(images, np.memmap)


def test_extracted_split_equals_npz_content(official_breastmnist):
    images, labels = load_split("breastmnist", "val", size=64, root=official_breastmnist)
    with np.load(official_breastmnist / "breastmnist_64.npz") as raw:
        np.testing.assert_array_equal(images, raw["val_images"])
        np.testing.assert_array_equal(labels, raw["val_labels"].reshape(-1))


def test_file_with_one_byte_changed_is_refused(official_breastmnist):
    path = official_breastmnist / "breastmnist.npz"
    blob = bytearray(path.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    path.write_bytes(bytes(blob))
    actual = hashlib.md5(bytes(blob)).hexdigest()
    with pytest.raises(ChecksumError) as error:
        load_split("breastmnist", "train", size=28, root=official_breastmnist)
    message = str(error.value)
    assert str(path) in message and actual in message
    assert "750601b1f35ba3300ea97c75c52ff8f6" in message and "Delete it" in message


def test_changed_file_is_rechecked_after_extraction(official_breastmnist):
    load_split("breastmnist", "train", size=28, root=official_breastmnist)
    path = official_breastmnist / "breastmnist.npz"
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(ChecksumError):
        load_split("breastmnist", "train", size=28, root=official_breastmnist)


def test_missing_file_offline_names_file_and_url(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"breastmnist_128\.npz is missing; download it from https://zenodo"):
        ensure_npz("breastmnist", 128, tmp_path, download=False)


def test_download_goes_through_medmnist_with_official_url_and_md5(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    calls = []

    def fake_download_url(url, root, filename, md5):
        calls.append((url, filename, md5))
        if not (data_dir := Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist").exists():
            raise OSError("network unreachable")
        shutil.copyfile(data_dir / filename, Path(root) / filename)

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download_url)
    url, md5 = data.official_source("breastmnist", 64)
    try:
        path = ensure_npz("breastmnist", 64, tmp_path)
    except RuntimeError as error:  # no official copy beside the checkout: the failure must name file and URL
        assert "breastmnist_64.npz" in str(error) and url in str(error)
    else:
        assert path == tmp_path / "breastmnist_64.npz"
    assert calls[0] == (url, "breastmnist_64.npz", md5)


def test_failed_download_names_file_and_url(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def unreachable(url, root, filename, md5):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", unreachable)
    with pytest.raises(RuntimeError, match=r"could not download pathmnist_224\.npz from https://zenodo.*unreachable"):
        ensure_npz("pathmnist", 224, tmp_path)


def test_bad_size_and_split_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"image size 32 is not a MedMNIST\+ size"):
        ensure_npz("breastmnist", 32, tmp_path)
    with pytest.raises(ValueError, match="unknown split 'valid'"):
        load_split("breastmnist", "valid", root=tmp_path)


# ---------------------------------------------------------------------------------------------- offline and in place
@pytest.fixture
def official_twin(monkeypatch):
    """``make(name, size, folder)``: a small synthetic twin saved as if it were the official file: without its
    SYNTHETIC.json, its md5 standing in for medmnist.INFO's (the URL stays the official one)."""
    md5s: dict[tuple[str, int], str] = {}
    official = data.official_source
    monkeypatch.setattr(data, "official_source",
                        lambda name, size: (official(name, size)[0], md5s.get((name, size), official(name, size)[1])))

    def make(name: str, size: int, folder: Path) -> Path:
        path = make_synthetic(name, size, 12, seed=0, root=folder)
        (folder / data.SYNTHETIC_MANIFEST).unlink()
        md5s[(name, size)] = data.file_md5(path)
        return path

    return make


NEEDED = ["pathmnist", "breastmnist", "bloodmnist", "organamnist", "octmnist"]


def test_offline_one_error_lists_every_missing_or_corrupt_file_with_url_and_size(official_twin, tmp_path,
                                                                                  monkeypatch):
    """BIOVLM_OFFLINE=1: nothing is downloaded; the error lists every configured file that is missing or damaged
    (wherever it lies: per-dataset folder or flat layout), not only the one asked for, and skips the good ones."""
    monkeypatch.setenv("BIOVLM_OFFLINE", "1")
    monkeypatch.setattr(data, "_download_with_medmnist", lambda *a: pytest.fail("no download expected offline"))
    root = tmp_path / "raw"
    official_twin("breastmnist", 224, root / "breastmnist")  # good, per-dataset folder
    official_twin("bloodmnist", 224, root)  # good, flat layout
    corrupt = official_twin("organamnist", 224, root / "organamnist")
    corrupt.write_bytes(corrupt.read_bytes()[:-1] + b"x")
    with pytest.raises(data.DataUnavailableError) as error:
        data.ensure_official("octmnist", 224, root, NEEDED)
    header, *lines = str(error.value).split("\n")
    missing = data.extracted_bytes("pathmnist", 224) + data.extracted_bytes("organamnist", 224) + \
        data.extracted_bytes("octmnist", 224)
    assert header == (
        f"3 of 5 MedMNIST files this configuration needs at 224 px are missing or damaged and cannot be downloaded "
        f"(BIOVLM_OFFLINE is set): on a connected machine, download each from its URL below into {root}/<dataset>/ "
        f"or, in medmnist's own flat layout, into {root}/ (data.root may point at an existing MedMNIST folder such "
        f"as ~/.medmnist), then rerun. Sizes are of the arrays once extracted ({missing / 1e9:.1f} GB in all; the "
        f"compressed npz files are smaller):")
    url = "https://zenodo.org/records/10519652/files/{}_224.npz?download=1"
    assert lines[0] == f"  pathmnist_224.npz    missing   16.1 GB  {url.format('pathmnist')}"
    assert lines[1].startswith(f"  organamnist_224.npz  corrupt    3.0 GB  {url.format('organamnist')}  ("
                               f"{corrupt}: md5 {data.file_md5(corrupt)}, expected ")
    assert lines[1].endswith("; delete or replace it)")
    assert lines[2] == f"  octmnist_224.npz     missing    5.5 GB  {url.format('octmnist')}"
    assert len(lines) == 3


def test_a_failed_download_lists_every_missing_file(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def unreachable(url, root, filename, md5):
        raise OSError("network unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", unreachable)
    with pytest.raises(data.DataUnavailableError) as error:
        data.ensure_official("breastmnist", 28, tmp_path, ["breastmnist", "pneumoniamnist"])
    header, *lines = str(error.value).split("\n")
    assert header.startswith("2 of 2 MedMNIST files this configuration needs at 28 px are missing or damaged and "
                             "cannot be downloaded (downloading breastmnist.npz failed: ")
    assert "network unreachable" in header
    assert [line.split()[:2] for line in lines] == [["breastmnist.npz", "missing"], ["pneumoniamnist.npz", "missing"]]


def test_extracted_bytes_are_those_of_the_official_arrays():
    """Measured on the official BreastMNIST files: 612,300 and 3,195,660 bytes of arrays, plus six 128-byte .npy
    headers."""
    assert data.extracted_bytes("breastmnist", 28) == 612_300 + 6 * 128
    assert data.extracted_bytes("breastmnist", 64) == 3_195_660 + 6 * 128
    assert 43e9 < sum(data.extracted_bytes(name, 224) for name in DATASETS) < 44e9  # docs: "about 44 GB"


@pytest.mark.parametrize(("size", "file"), [(28, "bloodmnist.npz"), (64, "bloodmnist_64.npz")])
def test_flat_layout_is_read_in_place_and_extracted_elsewhere(official_twin, tmp_path, size, file):
    """medmnist's own folder (<root>/<name>.npz at 28 px, <name>_<size>.npz above): md5-checked and read where it
    is; its arrays go to the cache folder; nothing is copied or written into the folder."""
    flat = tmp_path / "medmnist"
    twin = official_twin("bloodmnist", size, flat)
    assert twin.name == file
    flat.chmod(0o555)  # read-only (the tests may run as root, so the listing below is the real check)
    before = listing(flat)
    where = data.locate_npz("bloodmnist", size, flat, cache_root=tmp_path / "project")
    assert where == data.NpzLocation(flat / file, tmp_path / "project" / "bloodmnist", in_place=True)
    assert data.ensure_official("bloodmnist", size, flat, ["bloodmnist"]).npz == flat / file
    images, labels = load_split("bloodmnist", "val", size, flat, cache=where.cache)
    with np.load(twin) as raw:
        np.testing.assert_array_equal(images, raw["val_images"])
        np.testing.assert_array_equal(labels, raw["val_labels"].reshape(-1))
    assert listing(flat) == before
    assert (where.cache / ".extracted" / twin.stem / "val_images.npy").exists()
    flat.chmod(0o755)


def test_the_dataset_folder_takes_precedence_over_the_flat_layout(official_twin, tmp_path):
    official_twin("bloodmnist", 28, tmp_path)
    own = official_twin("bloodmnist", 28, tmp_path / "bloodmnist")
    assert data.locate_npz("bloodmnist", 28, tmp_path) == data.NpzLocation(own, own.parent)
    # neither present: the dataset's folder, where a download goes
    assert data.locate_npz("pathmnist", 224, tmp_path).npz == tmp_path / "pathmnist" / "pathmnist_224.npz"


def test_a_flat_file_with_the_wrong_md5_is_refused_and_nothing_extracted(official_twin, tmp_path):
    flat = tmp_path / "medmnist"
    twin = official_twin("bloodmnist", 28, flat)
    twin.write_bytes(twin.read_bytes()[:-1] + b"x")
    before = listing(flat)
    with pytest.raises(ChecksumError, match=rf"^{re.escape(str(twin))}: md5 {data.file_md5(twin)} does not match "
                                            rf"the expected [0-9a-f]{{32}} \(medmnist\.INFO\)\. The file is not the "
                                            rf"official one \(or is damaged\)\. Delete it"):
        data.ensure_official("bloodmnist", 28, flat, ["bloodmnist"])
    where = data.locate_npz("bloodmnist", 28, flat, cache_root=tmp_path / "project")
    with pytest.raises(ChecksumError):
        load_split("bloodmnist", "train", 28, flat, cache=where.cache)
    assert listing(flat) == before and not (tmp_path / "project").exists()


def test_official_breastmnist_is_used_in_place(official_breastmnist, tmp_path):
    """The real files, md5-checked against medmnist.INFO itself, read from a flat folder."""
    before = listing(official_breastmnist)
    for size in (28, 64):
        where = data.ensure_official("breastmnist", size, official_breastmnist, ["breastmnist"])
        assert where.in_place and where.npz.parent == official_breastmnist
        images, labels = load_split("breastmnist", "test", size, where.npz.parent, cache=tmp_path / "cache")
        assert images.shape == (156, size, size) and np.bincount(labels).tolist() == [42, 114]
    assert listing(official_breastmnist) == before
    extracted = tmp_path / "cache" / ".extracted" / "breastmnist"
    assert sum(f.stat().st_size for f in extracted.glob("*.npy")) == data.extracted_bytes("breastmnist", 28)


@pytest.mark.parametrize("size", [28, 64])
def test_synthetic_twin_has_the_official_layout(official_breastmnist, tmp_path, size):
    twin = make_synthetic("breastmnist", size, {"train": 40, "val": 10, "test": 20}, seed=1, root=tmp_path / "twin")
    official = data.npz_path("breastmnist", size, official_breastmnist)
    with np.load(twin) as fake, np.load(official) as real:
        assert list(fake.keys()) == list(real.keys())
        for key in real:
            assert fake[key].dtype == real[key].dtype
            assert fake[key].shape[1:] == real[key].shape[1:]


@pytest.mark.parametrize("name", list(DATASETS))
def test_synthetic_twin_of_every_dataset_loads(tmp_path, name):
    info = get_dataset(name)
    make_synthetic(name, 28, 3 * info.n_classes, seed=0, root=tmp_path)
    images, labels = load_split(name, "test", 28, tmp_path)
    expected = (3 * info.n_classes, 28, 28) if info.n_channels == 1 else (3 * info.n_classes, 28, 28, 3)
    assert images.shape == expected
    assert np.bincount(labels).tolist() == [3] * info.n_classes


def test_synthetic_twin_is_deterministic_and_class_structured(tmp_path):
    a = make_synthetic("bloodmnist", 28, 80, seed=3, root=tmp_path / "a")
    b = make_synthetic("bloodmnist", 28, 80, seed=3, root=tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    images, labels = load_split("bloodmnist", "train", 28, tmp_path / "a")
    # nearest class mean on the train split already separates classes far above chance (1/8)
    x = images.reshape(len(images), -1).astype(np.float32)
    means = np.stack([x[labels == c].mean(0) for c in range(8)])
    test_images, test_labels = load_split("bloodmnist", "test", 28, tmp_path / "a")
    t = test_images.reshape(len(test_images), -1).astype(np.float32)
    predicted = ((t[:, None] - means[None]) ** 2).sum(-1).argmin(1)
    assert (predicted == test_labels).mean() > 0.5


def test_synthetic_style_changes_the_look_not_the_labels(tmp_path):
    import json

    make_synthetic("bloodmnist", 28, 40, seed=3, root=tmp_path / "a")
    make_synthetic("bloodmnist", 28, 40, seed=3, root=tmp_path / "b", style=1)
    (x0, y0), (x1, y1) = (load_split("bloodmnist", "train", 28, tmp_path / r) for r in "ab")
    np.testing.assert_array_equal(y0, y1)
    tint = [x.reshape(-1, 3).mean(0) for x in (x0, x1)]  # another background and tint per dataset
    assert np.abs(tint[0] - tint[1]).max() > 5
    manifest = json.loads((tmp_path / "b" / "SYNTHETIC.json").read_text())
    assert manifest["bloodmnist.npz"]["style"] == 1


def test_synthetic_twin_is_verified_by_its_manifest(tmp_path):
    path = make_synthetic("pneumoniamnist", 28, 10, seed=0, root=tmp_path)
    path.write_bytes(path.read_bytes()[:-1] + b"\1")
    with pytest.raises(ChecksumError, match="synthetic manifest"):
        ensure_npz("pneumoniamnist", 28, tmp_path)


def test_iter_batches_covers_split_in_order(synthetic_root):
    images, _ = load_split("organamnist", "train", 28, synthetic_root)
    starts, total = [], []
    for start, batch in iter_batches(images, 100):
        starts.append(start)
        total.append(batch)
        assert not isinstance(batch, np.memmap)
    assert starts == [0, 100, 200]
    np.testing.assert_array_equal(np.concatenate(total), images)


def test_iter_batches_reads_mapped_splits_by_file_reads(tmp_path):
    """A whole memory-mapped split is read with file reads (its pages never become resident through the mapping);
    slices and plain arrays go through indexing; a file cut short is an error naming it and the fix."""
    rgb = (np.arange(7 * 4 * 4 * 3) % 251).astype(np.uint8).reshape(7, 4, 4, 3)
    np.save(tmp_path / "x.npy", rgb)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    for source, expected in ((mapped, rgb), (mapped[2:], rgb[2:]), (rgb, rgb)):
        batches = list(iter_batches(source, 3))
        assert [s for s, _ in batches] == list(range(0, len(expected), 3))
        np.testing.assert_array_equal(np.concatenate([b for _, b in batches]), expected)
        assert all(type(b) is np.ndarray for _, b in batches)
    with open(tmp_path / "x.npy", "r+b") as f:  # the mapping keeps its length; the file loses its last rows
        f.truncate(mapped.offset + 5 * 4 * 4 * 3)
    with pytest.raises(OSError, match=r"x\.npy ended early.*delete it"):
        list(iter_batches(mapped, 3))


# ---------------------------------------------------------------------------------------------- the extracted cache
FIX = "free space there or point that folder to a larger disk"


@pytest.fixture
def twin(synthetic_root, tmp_path) -> Path:
    """A private copy of the BloodMNIST twin's npz: its extracted cache is damaged by the test."""
    for name in ("bloodmnist.npz", data.SYNTHETIC_MANIFEST):
        shutil.copyfile(synthetic_root / name, tmp_path / name)
    return tmp_path


def assert_split_equals_npz(root: Path, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    with np.load(root / "bloodmnist.npz") as raw:
        np.testing.assert_array_equal(images, raw[f"{split}_images"])
        np.testing.assert_array_equal(labels, raw[f"{split}_labels"].reshape(-1))


DAMAGES = {
    "deleted": lambda f: f.unlink(),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[:-50]),
    # same size, header kept: np.load reads it without complaint
    "zeroed": lambda f: f.write_bytes(f.read_bytes()[:128] + bytes(f.stat().st_size - 128)),
}


@pytest.mark.parametrize("part", ["labels", "images"])
@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_extracted_file_is_re_extracted_with_a_notice(twin, capsys, damage, part):
    load_split("bloodmnist", "train", 28, twin)
    file = twin / ".extracted" / "bloodmnist" / f"train_{part}.npy"
    size = file.stat().st_size
    DAMAGES[damage](file)
    capsys.readouterr()
    images, labels = load_split("bloodmnist", "train", 28, twin)
    why = {"deleted": "is missing", "truncated": f"has {size - 50} bytes, {size} were extracted",
           "zeroed": "has other content than was extracted"}[damage]
    assert capsys.readouterr().err == f"biovlm: {file} {why}: re-extracting from {twin / 'bloodmnist.npz'}\n"
    assert_split_equals_npz(twin, "train", images, labels)
    load_split("bloodmnist", "train", 28, twin)
    assert capsys.readouterr().err == ""  # trusted again


def test_large_extracted_files_are_checked_by_sampled_blocks(twin, capsys, monkeypatch):
    monkeypatch.setattr(data, "FULL_HASH_BYTES", 4096)  # as a multi-GB split would be
    monkeypatch.setattr(data, "SAMPLE_BLOCK", 1024)
    monkeypatch.setattr(data, "SAMPLE_BLOCKS", 8)
    load_split("bloodmnist", "train", 28, twin)
    folder = twin / ".extracted" / "bloodmnist"
    manifest = json.loads((folder / data.EXTRACTED_MANIFEST).read_text())
    assert manifest["source"] == {"name": "bloodmnist.npz", "bytes": (twin / "bloodmnist.npz").stat().st_size,
                                  "mtime_ns": (twin / "bloodmnist.npz").stat().st_mtime_ns}
    file = folder / "train_images.npy"
    blob, size = file.read_bytes(), 128 + 264 * 28 * 28 * 3
    samples = b"".join(blob[start : start + 1024] for start in ((size - 1024) * i // 7 for i in range(8)))
    assert manifest["arrays"]["train_images"] == {"bytes": size, "sampled_sha256": hashlib.sha256(samples).hexdigest()}
    labels = (folder / "train_labels.npy").read_bytes()
    assert manifest["arrays"]["train_labels"] == {"bytes": 128 + 264, "sha256": hashlib.sha256(labels).hexdigest()}
    DAMAGES["zeroed"](file)
    capsys.readouterr()
    images, labels = load_split("bloodmnist", "train", 28, twin)
    assert capsys.readouterr().err.startswith(f"biovlm: {file} has other content than was extracted: re-extracting")
    assert_split_equals_npz(twin, "train", images, labels)


def test_a_damaged_file_is_not_re_extracted_from_a_changed_npz(twin):
    load_split("bloodmnist", "val", 28, twin)
    DAMAGES["zeroed"](twin / ".extracted" / "bloodmnist" / "val_labels.npy")
    npz = twin / "bloodmnist.npz"
    stat = npz.stat()
    blob = bytearray(npz.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    os.utime(npz, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same size and time: only the md5 tells
    with pytest.raises(ChecksumError, match=rf"^{re.escape(str(npz))}: md5 {hashlib.md5(blob).hexdigest()} does not"):
        load_split("bloodmnist", "val", 28, twin)
    blob[len(blob) // 2] ^= 0xFF
    npz.write_bytes(bytes(blob))
    assert_split_equals_npz(twin, "val", *load_split("bloodmnist", "val", 28, twin))


def test_extraction_on_a_full_disk_is_one_clear_error_and_keeps_what_was_done(twin, disk, monkeypatch, capsys):
    folder = twin / ".extracted" / "bloodmnist"
    # 128-byte headers; train, val, test: 264, 44, 88 RGB 28-px images and as many uint8 labels
    needed = 6 * 128 + (264 + 44 + 88) * (28 * 28 * 3 + 1)
    assert needed == 932_556
    disk.free = needed - 1
    message = (f"not enough disk space in {folder}: extracting bloodmnist.npz needs 932,556 bytes (932.6 kB), only "
               f"932,555 bytes (932.6 kB) free; {FIX}")
    with pytest.raises(data.storage.DiskFullError, match=f"^{re.escape(message)}$"):
        load_split("bloodmnist", "train", 28, twin)
    assert os.listdir(folder) == []  # checked before writing

    disk.free = needed
    calls = []

    def fills_up(fd, offset, length):  # the disk fills after the first array (another process)
        calls.append(length)
        if len(calls) == 2:
            disk.free = 100
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", fills_up)
    message = (f"not enough disk space in {folder}: extracting train_labels from bloodmnist.npz needs 392 bytes, only "
               f"100 bytes free; {FIX}")
    with pytest.raises(data.storage.DiskFullError, match=f"^{re.escape(message)}$"):
        load_split("bloodmnist", "train", 28, twin)
    assert calls == [128 + 264 * 2352, 128 + 264]
    assert sorted(os.listdir(folder)) == ["manifest.json", "train_images.npy"]  # no temporary file
    assert list(json.loads((folder / "manifest.json").read_text())["arrays"]) == ["train_images"]

    disk.free = 10**9
    capsys.readouterr()
    images, labels = load_split("bloodmnist", "train", 28, twin)  # the labels only: the images were complete
    assert capsys.readouterr().err == (f"biovlm: {folder / 'train_labels.npy'} was not extracted: re-extracting "
                                       f"from {twin / 'bloodmnist.npz'}\n")
    assert calls[2:] == [128 + 264]
    assert_split_equals_npz(twin, "train", images, labels)


def test_light_import_does_not_pull_torch():
    import subprocess
    import sys

    code = "import sys, biovlm.data, biovlm.prompts; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
