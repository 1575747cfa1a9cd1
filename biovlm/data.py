"""The 11 MedMNIST+ 2D datasets: registry, verified download, memory-mapped splits, synthetic twins.

Every later stage reads images through this module. It imports no torch: reading class names from
``medmnist.INFO`` loads ``medmnist/info.py`` on its own, because ``import medmnist`` pulls in torch and
torchvision (about 6 s per process, and the pipeline starts dozens of processes).

Splits are read from the official ``.npz`` once, streamed member by member into uncompressed ``.npy`` files next
to it (``<root>/.extracted/``), and then opened with ``np.load(mmap_mode="r")``: a 224-px TissueMNIST split
(8.3 GB for train) is never held in memory. A manifest of the extracted files' sizes and content hashes is checked
on every read; a deleted, truncated or changed file is re-extracted.

Official files are found in ``<data.root>/<dataset>/`` (where downloads go) or, in medmnist's own flat layout, in
``<data.root>/`` itself: such a file is read in place (md5-checked, never copied or written to) and its arrays are
extracted into the project's ``data/raw/<dataset>/`` instead (``locate_npz``). ``BIOVLM_OFFLINE=1`` forbids
downloads; a file that cannot be had then, or when a download fails, is one error listing every missing or damaged
file the configuration needs, with its URL and size (``ensure_official``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import mmap
import os
import sys
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np

from biovlm import storage

SIZES = (28, 64, 128, 224)
SPLITS = ("train", "val", "test")
SYNTHETIC_MANIFEST = "SYNTHETIC.json"
# Set to 1 (or true, yes, on) to forbid downloads, as HF_HUB_OFFLINE does for the backbone (biovlm/hub.py).
OFFLINE_ENV = "BIOVLM_OFFLINE"
# The project's per-dataset folders (relative to the repository root; dvc.yaml's download outs): where the arrays of
# a file read in place from medmnist's flat layout are extracted.
RAW_DIR = Path("data/raw")
ARRAYS = tuple(f"{split}_{part}" for split in SPLITS for part in ("images", "labels"))
# The extracted cache (<root>/.extracted/<npz stem>/) holds one .npy per array and this manifest: the npz it came
# from (name, size, mtime) and each file's size and content hash, checked on every read. Files up to
# FULL_HASH_BYTES (every label file, small image files) are hashed whole; larger ones by SAMPLE_BLOCKS blocks of
# SAMPLE_BLOCK bytes spread evenly over the file (4 MiB read, milliseconds). Sizes catch deleted and truncated
# files and the samples a zeroed or rewritten one, but not a change confined between two samples: hashing all of
# a 20 GB split on every read would take about a minute.
EXTRACTED_MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
FULL_HASH_BYTES = 32 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK = 64 << 10

# Per-dataset facts that medmnist.INFO does not hold: the phrase that says what kind of image it is (used in every
# text prompt) and, for RetinaMNIST, how its bare grade labels "0".."4" read in a sentence.
_MODALITY = {
    "pathmnist": ("colon pathology slide", "{}"),
    "dermamnist": ("dermatoscopic image", "{}"),
    "octmnist": ("retinal OCT scan", "{}"),
    "pneumoniamnist": ("pediatric chest X-ray", "{}"),
    "retinamnist": ("fundus photograph", "diabetic retinopathy grade {}"),
    "breastmnist": ("breast ultrasound", "{}"),
    "bloodmnist": ("blood cell microscopy image", "{}"),
    "tissuemnist": ("kidney cortex microscopy image", "{}"),
    "organamnist": ("abdominal CT in axial view", "{}"),
    "organcmnist": ("abdominal CT in coronal view", "{}"),
    "organsmnist": ("abdominal CT in sagittal view", "{}"),
}

# The class names as the paper's public code prompts them: the class keys of its attribute files
# (attributes_medmnist/<dataset>.json, see biovlm/reference.py), written here in label-id order. They differ from
# medmnist's texts for dermamnist (label 2), retinamnist (all: grades 0..4 as words), breastmnist (label 1) and
# tissuemnist (all: lower case, "and" for the comma); a test checks them against the files' keys.
_ORGANS = ("bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right", "liver", "lung-left",
           "lung-right", "pancreas", "spleen")
REFERENCE_NAMES: dict[str, tuple[str, ...]] = {
    "pathmnist": ("adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle", "normal colon mucosa",
                  "cancer-associated stroma", "colorectal adenocarcinoma epithelium"),
    "dermamnist": ("actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma", "benign keratosis",
                   "dermatofibroma", "melanoma", "melanocytic nevi", "vascular lesions"),
    "octmnist": ("choroidal neovascularization", "diabetic macular edema", "drusen", "normal"),
    "pneumoniamnist": ("normal", "pneumonia"),
    "retinamnist": ("normal retina", "mild diabetic retinopathy", "moderate diabetic retinopathy",
                    "severe diabetic retinopathy", "proliferative diabetic retinopathy"),
    "breastmnist": ("malignant", "benign"),
    "bloodmnist": ("basophil", "eosinophil", "erythroblast",
                   "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)", "lymphocyte", "monocyte",
                   "neutrophil", "platelet"),
    "tissuemnist": ("collecting duct and connecting tubule", "distal convoluted tubule", "glomerular endothelial cells",
                    "interstitial endothelial cells", "leukocytes", "podocytes", "proximal tubule segments",
                    "thick ascending limb"),
    "organamnist": _ORGANS,
    "organcmnist": _ORGANS,
    "organsmnist": _ORGANS,
}
# How the public BioVLM code words an attribute text (trainers/biovlm.py, load_gpt_descriptions): "<prefix> <class
# name> <suffix>, <attribute as a which-clause>", with this prefix and suffix per dataset.
REFERENCE_PHRASES: dict[str, tuple[str, str]] = {
    "pathmnist": ("a colon pathology of", "type of colorectal cancer"),
    "dermamnist": ("a dermatoscopic image of", "type of skin lesion"),
    "octmnist": ("an optical coherence tomography image of", "retina"),
    "pneumoniamnist": ("a pediatric X-Ray image of", "chest"),
    "retinamnist": ("a fundus image of", ""),
    "breastmnist": ("an ultrasound image of", "tumor found in breast tissue"),
    "bloodmnist": ("a microscopic image of", "type of blood cell"),
    "tissuemnist": ("a microscopic image of", "type of kidney cortex cell"),
    **{name: ("a cropped 2D image from the center slices of the bounding boxes of 3D computed tomography image of",
              f"organ in {view} views") for name, view in (("organamnist", "axial"), ("organcmnist", "coronal"),
                                                            ("organsmnist", "sagittal"))},
}
# data.attribute_template in params.yaml: "reference" (REFERENCE_PHRASES, the public code's sentences) or
# "project" ("<modality> of <class>, which has <attribute>").
ATTRIBUTE_TEMPLATES = ("reference", "project")
# data.template in params.yaml: the hand-written zero-shot sentence of the template baselines (zero-shot, KgCoOp's
# anchor, CLIP-Adapter's classifier). Published (BiomedCoOp's prompt_templates.py for BiomedCLIP): "a photo of a {}.".
PUBLISHED_TEMPLATE = "a photo of a {}."
PROJECT_TEMPLATE = "a {modality} of {}."
# data.class_names in params.yaml: which names the prompts use. "medmnist": medmnist's label texts (class_format
# applied); "reference": REFERENCE_NAMES.
CLASS_NAMES = ("reference", "medmnist")


@dataclass(frozen=True)
class DatasetInfo:
    """One benchmark dataset. ``classes`` are medmnist's label texts in label order (never retyped);
    ``reference_names`` the paper's names in the same order; ``class_names`` says which of the two prompts use."""

    name: str
    display_name: str  # as tables and figures print it: medmnist's class name of the dataset ("PathMNIST")
    classes: tuple[str, ...]
    n_channels: int
    task: str
    modality: str
    n_samples: Mapping[str, int] = field(default_factory=dict, hash=False)  # images per split (empty: unknown)
    class_format: str = "{}"
    reference_names: tuple[str, ...] = ()
    class_names: str = "medmnist"
    reference_phrase: tuple[str, str] = ("", "")  # prefix and suffix of the public code's attribute texts
    attribute_template: str = "project"
    hand_template: str = PROJECT_TEMPLATE  # the zero-shot sentence: "{}" the class name, "{modality}" the modality

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def prompt_names(self) -> tuple[str, ...]:
        """Class names as they appear in text prompts: medmnist's (``class_format`` applied) or the reference's."""
        if self.class_names == "reference":
            return self.reference_names
        return tuple(self.class_format.format(c) for c in self.classes)


    def to_meta(self) -> dict:
        """Everything that words this dataset's prompts, as JSON values (what a method checkpoint records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items() if k != "n_samples"}

    @classmethod
    def from_meta(cls, meta: Mapping) -> DatasetInfo:
        """The dataset ``to_meta`` recorded (split sizes from the registry for a benchmark dataset, else none)."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in meta.items()}
        registered = DATASETS.get(fields.get("name"))
        return cls(**fields, n_samples=dict(registered.n_samples) if registered else {})


def custom_dataset(classes: Sequence[str], like: DatasetInfo | None = None, name: str | None = None,
                   modality: str | None = None) -> DatasetInfo:
    """A dataset of your own class list, whose prompts name the classes exactly as given.

    ``like``: the dataset whose prompt wording (modality, templates, channels) and name to keep, e.g. the ``info``
    of a trained method, so that its prompts read as in training; ``name`` and ``modality`` override them. Without
    ``like``: 3-channel images of ``modality`` (default "medical image") and this project's templates.
    """
    names = list(classes)
    if any(not isinstance(n, str) or not n.strip() for n in names):
        raise ValueError(f"class names must be non-empty strings, got {names}")
    if len(names) < 2:
        raise ValueError(f"a class list needs at least two classes (a classifier chooses between them), got {names}")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"class names must be distinct; repeated: {dupes}")
    base = like or DatasetInfo(name="custom", display_name="custom", classes=(), n_channels=3, task="multi-class",
                               modality="medical image")
    return replace(base, name=name or base.name, display_name=name or base.display_name,
                   modality=modality or base.modality, classes=tuple(names),
                   n_samples={}, class_format="{}", reference_names=(), class_names="medmnist")


@cache
def medmnist_info() -> dict:
    """``medmnist.INFO``, loaded from ``medmnist/info.py`` without importing the package (and torch with it)."""
    spec = importlib.util.find_spec("medmnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'medmnist' package is not installed: pip install medmnist")
    path = Path(next(iter(spec.submodule_search_locations))) / "info.py"
    info_spec = importlib.util.spec_from_file_location("_biovlm_medmnist_info", path)
    module = importlib.util.module_from_spec(info_spec)
    info_spec.loader.exec_module(module)
    return module.INFO


def _build_registry() -> dict[str, DatasetInfo]:
    info = medmnist_info()
    registry = {}
    for name, (modality, class_format) in _MODALITY.items():
        entry = info[name]
        labels = entry["label"]
        registry[name] = DatasetInfo(
            name=name,
            display_name=entry["python_class"],
            classes=tuple(labels[str(i)] for i in range(len(labels))),
            n_channels=int(entry["n_channels"]),
            task=entry["task"],
            modality=modality,
            n_samples=dict(entry["n_samples"]),
            class_format=class_format,
            reference_names=REFERENCE_NAMES[name],
            reference_phrase=REFERENCE_PHRASES[name],
        )
    return registry


DATASETS: dict[str, DatasetInfo] = _build_registry()


def display_name(name: str) -> str:
    """The name tables and figures print for dataset ``name`` (an unknown name prints as itself)."""
    return DATASETS[name].display_name if name in DATASETS else name


def get_dataset(name: str, class_names: str = "medmnist", attribute_template: str = "project",
                hand_template: str = PROJECT_TEMPLATE) -> DatasetInfo:
    """The registry entry for ``name`` with the prompt names ``class_names`` ("medmnist" or "reference"), the
    attribute wording ``attribute_template`` ("project" or "reference") and the zero-shot sentence
    ``hand_template``; anything else (chestmnist, 3D sets, typos) is a clear error."""
    if class_names not in CLASS_NAMES:
        raise ValueError(f"unknown class names {class_names!r}; valid: {', '.join(CLASS_NAMES)}")
    if attribute_template not in ATTRIBUTE_TEMPLATES:
        raise ValueError(f"unknown attribute template {attribute_template!r}; valid: {', '.join(ATTRIBUTE_TEMPLATES)}")
    check_template(hand_template)
    if name in DATASETS:
        info = DATASETS[name]
        wanted = {"class_names": class_names, "attribute_template": attribute_template, "hand_template": hand_template}
        if all(getattr(info, k) == v for k, v in wanted.items()):
            return info
        return replace(info, **wanted)
    why = " (multi-label: not part of this single-label benchmark)" if name == "chestmnist" else ""
    raise ValueError(f"unknown dataset {name!r}{why}; valid names: {', '.join(DATASETS)}")


def check_template(template: str) -> None:
    """A hand template holds exactly one "{}" (the class name) and may hold "{modality}"."""
    try:
        ok = isinstance(template, str) and template.count("{}") == 1 and bool(template.format("x", modality="m"))
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"data.template must hold one '{{}}' for the class name (and may hold '{{modality}}'), "
                         f"e.g. {PUBLISHED_TEMPLATE!r}; got {template!r}")


def _check_size(size: int) -> None:
    if size not in SIZES:
        raise ValueError(f"image size {size!r} is not a MedMNIST+ size; choose one of {SIZES}")


def _size_suffix(size: int) -> str:
    return "" if size == 28 else f"_{size}"


def npz_path(name: str, size: int, root: str | Path) -> Path:
    """Where medmnist keeps ``name`` at ``size``: ``<root>/<flag>.npz`` (28 px) or ``<flag>_<size>.npz``."""
    get_dataset(name)
    _check_size(size)
    return Path(root) / f"{name}{_size_suffix(size)}.npz"


def official_source(name: str, size: int) -> tuple[str, str]:
    """(url, md5) of the official file, as recorded in ``medmnist.INFO``."""
    entry = medmnist_info()[get_dataset(name).name]
    suffix = _size_suffix(size)
    return entry[f"url{suffix}"], entry[f"MD5{suffix}"]


def file_md5(path: str | Path) -> str:
    return file_hash(path, "md5")


def file_hash(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


class ChecksumError(ValueError):
    """A data file is present but is not the file the benchmark expects."""


class DownloadError(RuntimeError):
    """Downloading an official file failed (no network, HTTP error, bad checksum); ``reason`` says how."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DataUnavailableError(FileNotFoundError):
    """Official files the configuration needs are missing or damaged and cannot be downloaded."""


def offline() -> bool:
    """Whether ``BIOVLM_OFFLINE`` forbids downloads (1, true, yes or on)."""
    return os.environ.get(OFFLINE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def extracted_bytes(name: str, size: int) -> int:
    """Disk the arrays of ``name`` at ``size`` take once extracted (uint8 images and labels, split sizes from
    ``medmnist.INFO``). The npz itself is compressed and somewhat smaller; its exact size is only on the server."""
    info = get_dataset(name)
    _check_size(size)
    pixels = size * size * info.n_channels
    total = 0
    for n in info.n_samples.values():
        total += len(_npy_header((n, size, size), np.dtype(np.uint8))) + n * pixels
        total += len(_npy_header((n, 1), np.dtype(np.uint8))) + n
    return total


@dataclass(frozen=True)
class NpzLocation:
    """Where one dataset's npz is read (``npz``) and where its arrays are extracted (``cache``/.extracted/)."""

    npz: Path
    cache: Path
    in_place: bool = False  # read from medmnist's flat layout: nothing is ever written beside it


def locate_npz(name: str, size: int, root: str | Path, cache_root: str | Path = RAW_DIR) -> NpzLocation:
    """Where the official npz of ``name`` at ``size`` is for ``data.root`` = ``root``.

    ``<root>/<name>/<file>`` (the project's layout, where a download goes) when it exists or nothing else does; else
    ``<root>/<file>`` (medmnist's own flat layout, e.g. ``~/.medmnist``) when that exists: it is read in place and its
    arrays are extracted into ``<cache_root>/<name>/`` (the project's folder), so a shared or read-only MedMNIST folder
    is never written to. A leading ``~`` in ``root`` is the user's home.
    """
    root = Path(root).expanduser()
    own = npz_path(name, size, root / name)
    flat = npz_path(name, size, root)
    if not own.exists() and flat.exists():
        return NpzLocation(flat, Path(cache_root) / name, in_place=True)
    return NpzLocation(own, own.parent)


def expected_md5(name: str, size: int, path: Path) -> tuple[str, str]:
    """(md5, where it comes from): a synthetic twin's manifest in that folder, else the official INFO entry."""
    manifest = path.parent / SYNTHETIC_MANIFEST
    if manifest.exists():
        entries = json.loads(manifest.read_text())
        if path.name in entries:
            return entries[path.name]["md5"], f"synthetic manifest {manifest}"
    return official_source(name, size)[1], "medmnist.INFO"


def ensure_npz(name: str, size: int = 28, root: str | Path = "data/raw", download: bool = True) -> Path:
    """Return the md5-verified npz of ``name`` at ``size``, downloading it through medmnist when missing (unless
    ``download`` is False or ``BIOVLM_OFFLINE`` is set).

    A present file with the wrong md5 is refused, never used or overwritten: re-saved copies with the same images
    but other labels circulate publicly.
    """
    path = npz_path(name, size, root)
    if path.exists():
        expected, source = expected_md5(name, size, path)
        actual = file_md5(path)
        if actual != expected:
            raise ChecksumError(
                f"{path}: md5 {actual} does not match the expected {expected} ({source}). The file is not the "
                f"official one (or is damaged). Delete it and rerun to download the official file"
                f" (url: {official_source(name, size)[0]})."
            )
        return path
    url, _ = official_source(name, size)
    if not download:
        raise FileNotFoundError(f"{path} is missing; download it from {url} (or allow downloading)")
    if offline():
        raise FileNotFoundError(f"{path} is missing and {OFFLINE_ENV} is set; download it from {url} on a connected "
                                f"machine and put it there (or unset {OFFLINE_ENV})")
    _download_with_medmnist(name, size, Path(root), url)
    return ensure_npz(name, size, root, download=False)


def ensure_official(name: str, size: int, root: str | Path, names: Sequence[str]) -> NpzLocation:
    """The md5-verified official npz of ``name`` for ``data.root`` = ``root`` (see ``locate_npz``), downloaded when
    missing. ``names`` are all the datasets the configuration needs: when the file cannot be had (``BIOVLM_OFFLINE``
    set, or the download fails), one ``DataUnavailableError`` lists every one of them that is missing or damaged,
    each with its URL and size, and says where to put them."""
    names = list(names) if name in names else [*names, name]
    where = locate_npz(name, size, root)
    try:
        ensure_npz(name, size, where.npz.parent, download=True)
    except DownloadError as error:
        raise _unavailable(names, size, root, f"downloading {where.npz.name} failed: {error.reason}") from error
    except FileNotFoundError as error:
        if not offline():
            raise
        raise _unavailable(names, size, root, f"{OFFLINE_ENV} is set") from error
    return where


def _unavailable(names: Sequence[str], size: int, root: str | Path, why: str) -> DataUnavailableError:
    """The error that lists every file of ``names`` that is missing or fails its md5 check (present files are
    hashed at about 0.7 GB/s: a minute or so for all eleven 224-px files), one line each."""
    rows, total = [], 0
    for name in names:
        path = locate_npz(name, size, root).npz
        if not path.exists():
            status, note = "missing", ""
        elif (actual := file_md5(path)) != (expected := expected_md5(name, size, path)[0]):
            status, note = "corrupt", f"  ({path}: md5 {actual}, expected {expected}; delete or replace it)"
        else:
            continue
        total += (nbytes := extracted_bytes(name, size))
        rows.append((path.name, status, storage.readable(nbytes), official_source(name, size)[0], note))
    width = max(len(row[0]) for row in rows)
    lines = [f"  {file:<{width}}  {status}  {nbytes:>8}  {url}{note}" for file, status, nbytes, url, note in rows]
    root = Path(root).expanduser()
    return DataUnavailableError(
        f"{len(rows)} of {len(names)} MedMNIST files this configuration needs at {size} px are missing or damaged and "
        f"cannot be downloaded ({why}): on a connected machine, download each from its URL below into "
        f"{root / '<dataset>'}/ or, in medmnist's own flat layout, into {root}/ (data.root may point at an existing "
        f"MedMNIST folder such as ~/.medmnist), then rerun. Sizes are of the arrays once extracted "
        f"({storage.readable(total)} in all; the compressed npz files are smaller):\n" + "\n".join(lines))


def _download_with_medmnist(name: str, size: int, root: Path, url: str) -> None:
    """medmnist's own download (official URL and md5 check, through torchvision's ``download_url``)."""
    import medmnist  # heavy: imports torch; only needed here

    root.mkdir(parents=True, exist_ok=True)
    dataset_class = getattr(medmnist, medmnist_info()[name]["python_class"])
    try:
        dataset_class(split="test", root=str(root), size=size, download=True)
    except Exception as error:  # network, HTTP and checksum failures all end here
        cause = error
        while cause.__context__ is not None:  # medmnist wraps the real failure in a generic message
            cause = cause.__context__
        reason = f"{type(cause).__name__}: {cause}"
        raise DownloadError(
            f"could not download {npz_path(name, size, root).name} from {url} ({reason}). Without network access, "
            f"fetch that file elsewhere and place it at {npz_path(name, size, root)}.", reason[:200]
        ) from error


# ---------------------------------------------------------------------------------------------- split access


def _extracted_dir(path: Path, cache: str | Path | None = None) -> Path:
    """``<cache>/.extracted/<npz stem>/``; ``cache`` defaults to the npz's own folder."""
    return Path(path.parent if cache is None else cache) / ".extracted" / path.stem


def _read_member_header(member, key: str) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(member)
    if fortran_order:
        raise ValueError(f"{key} is stored in Fortran order; MedMNIST files are C-ordered: is this file intact?")
    return shape, dtype


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> bytes:
    """The header ``np.lib.format.open_memmap`` would write for a C-ordered array."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _stream_member_to_npy(archive: zipfile.ZipFile, key: str, target: Path, rows_per_chunk: int = 2048) -> None:
    """Copy one array out of an npz into an uncompressed .npy, a few thousand rows at a time.

    The file's space is reserved before the first row is written and the rows go in with plain writes, not through
    a memory map: a write through a map that finds the disk full kills the process with SIGBUS ("Bus error", no
    message) and leaves a sparse temporary file behind.
    """
    with archive.open(f"{key}.npy") as member:
        shape, dtype = _read_member_header(member, key)
        header = _npy_header(shape, dtype)
        row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize

        def write(tmp: Path) -> None:
            with open(tmp, "r+b") as out:  # the reserved file: "wb" would give its space back
                out.write(header)
                for start in range(0, shape[0], rows_per_chunk):
                    n = (min(start + rows_per_chunk, shape[0]) - start) * row_bytes
                    buf = member.read(n)
                    if len(buf) != n:
                        raise ValueError(f"{archive.filename}: {key} ends before its {shape[0]} rows: is this file "
                                         f"intact?")
                    out.write(buf)

        storage.atomic_write(target, write, len(header) + shape[0] * row_bytes,
                             f"extracting {key} from {Path(archive.filename).name}", preallocate=True)


def _source_stamp(path: Path) -> dict:
    stat = path.stat()
    return {"name": path.name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def content_stamp(path: str | Path) -> dict:
    """Size and SHA-256 of an extracted file: of every byte up to ``FULL_HASH_BYTES``, else of ``SAMPLE_BLOCKS``
    blocks of ``SAMPLE_BLOCK`` bytes spread evenly from the first byte to the last (see ``EXTRACTED_MANIFEST``)."""
    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            return {"bytes": size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        digest = hashlib.sha256()
        for i in range(SAMPLE_BLOCKS):
            f.seek(max(size - SAMPLE_BLOCK, 0) * i // (SAMPLE_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BLOCK))
    return {"bytes": size, "sampled_sha256": digest.hexdigest()}


def _damage(file: Path, stamp: dict | None) -> str | None:
    """Why an extracted file cannot be trusted (None: it is as extracted)."""
    if stamp is None:
        return "was not extracted"
    if not file.exists():
        return "is missing"
    size = file.stat().st_size
    if size != stamp["bytes"]:
        return f"has {size} bytes, {stamp['bytes']} were extracted"
    if content_stamp(file) != stamp:
        return "has other content than was extracted"
    return None


def _read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / EXTRACTED_MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT else None


def _write_manifest(folder: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    storage.atomic_write(folder / EXTRACTED_MANIFEST, lambda tmp: tmp.write_text(text), len(text),
                         f"writing {EXTRACTED_MANIFEST}")


def _extract(path: Path, keys: tuple[str, ...] = ARRAYS, cache: str | Path | None = None) -> Path:
    """Extract the arrays ``keys`` of ``path`` into ``_extracted_dir(path, cache)`` (every array when the npz is not
    the manifest's source), recording each in the manifest as soon as it is complete. The files being replaced are
    deleted first: they are stale or damaged, and their space is needed."""
    folder = _extracted_dir(path, cache)
    folder.mkdir(parents=True, exist_ok=True)
    manifest = _read_manifest(folder)
    if manifest is None or manifest["source"] != _source_stamp(path):
        manifest, keys = {"format": MANIFEST_FORMAT, "source": _source_stamp(path), "arrays": {}}, ARRAYS
        (folder / EXTRACTED_MANIFEST).unlink(missing_ok=True)
        (folder / "source.json").unlink(missing_ok=True)  # the stamp of earlier versions, without content hashes
        for leftover in folder.glob("*.tmp.npy"):  # earlier versions' temporary files
            leftover.unlink()
    storage.remove_stale_temporaries(folder)
    with zipfile.ZipFile(path) as archive:
        members = {n.removesuffix(".npy") for n in archive.namelist()}
        if missing := sorted(set(ARRAYS) - members):
            raise ValueError(f"{path} lacks the arrays {missing}; it is not a MedMNIST file")
        for key in keys:
            manifest["arrays"].pop(key, None)
            (folder / f"{key}.npy").unlink(missing_ok=True)
        needed = 0
        for key in keys:
            with archive.open(f"{key}.npy") as member:
                shape, dtype = _read_member_header(member, key)
            needed += len(_npy_header(shape, dtype)) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        storage.check_free(folder, needed, f"extracting {path.name}")  # before minutes of work, not after
        for key in keys:
            _stream_member_to_npy(archive, key, folder / f"{key}.npy")
            manifest["arrays"][key] = content_stamp(folder / f"{key}.npy")
            _write_manifest(folder, manifest)
    return folder


def load_split(
    name: str, split: str, size: int = 28, root: str | Path = "data/raw", download: bool = False,
    cache: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8 ``[N,H,W]`` or ``[N,H,W,3]``, memory-mapped) and labels (int64 ``[N]``) of one split of the npz
    in ``root``, extracted into ``<cache>/.extracted/`` (default: ``root``; see ``locate_npz`` for a file read in
    place).

    The split's extracted files are checked against the extraction manifest on every read and re-extracted (with a
    one-line notice on stderr) when they are missing, truncated or changed.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    info = get_dataset(name)
    path = npz_path(name, size, root)
    folder = _extracted_dir(path, cache)
    manifest = _read_manifest(folder)
    # Verify the md5 only when the file is new or changed: hashing a multi-GB file on every read would dominate.
    if not path.exists() or manifest is None or manifest["source"] != _source_stamp(path):
        ensure_npz(name, size, root, download=download)
        _extract(path, cache=cache)
    else:
        keys = (f"{split}_images", f"{split}_labels")
        damaged = {key: why for key in keys if (why := _damage(folder / f"{key}.npy", manifest["arrays"].get(key)))}
        if damaged:
            print(f"biovlm: {'; '.join(f'{folder / key}.npy {why}' for key, why in damaged.items())}: re-extracting "
                  f"from {path}", file=sys.stderr, flush=True)
            ensure_npz(name, size, root, download=False)  # the npz may have suffered too
            _extract(path, tuple(damaged), cache)
    images = np.load(folder / f"{split}_images.npy", mmap_mode="r")
    labels = np.load(folder / f"{split}_labels.npy").reshape(-1).astype(np.int64)
    expected_ndim = 3 if info.n_channels == 1 else 4
    if images.ndim != expected_ndim or images.shape[1:3] != (size, size) or len(images) != len(labels):
        raise ValueError(
            f"{path}: {split} images have shape {images.shape} and {len(labels)} labels; expected "
            f"[N,{size},{size}{'' if info.n_channels == 1 else ',3'}] with one label each"
        )
    return images, labels


def iter_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    """``(start, batch)`` pairs; each batch is an in-memory copy of ``batch_size`` rows of a split.

    A whole memory-mapped split (as ``load_split`` returns) is read with plain file reads instead of through the
    mapping: pages touched through a mapping count as the process's resident memory until it exits, so streaming
    a 7 GB split would show 7 GB resident; read pages only pass through the kernel's page cache.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    whole_file = (isinstance(images, np.memmap) and isinstance(images.base, mmap.mmap)
                  and images.flags.c_contiguous and images.filename is not None)
    if not whole_file:
        for start in range(0, len(images), batch_size):
            yield start, np.array(images[start : start + batch_size])
        return
    row_bytes = images.itemsize * int(np.prod(images.shape[1:], dtype=np.int64))
    with open(images.filename, "rb", buffering=0) as f:
        for start in range(0, len(images), batch_size):
            batch = np.empty((min(batch_size, len(images) - start), *images.shape[1:]), dtype=images.dtype)
            f.seek(images.offset + start * row_bytes)
            view = memoryview(batch).cast("B")
            while view:  # a raw read may return fewer bytes than asked
                n = f.readinto(view)
                if not n:
                    raise OSError(f"{images.filename} ended early: it is shorter than its header says; delete it "
                                  f"(it is re-extracted from the npz on the next read)")
                view = view[n:]
            yield start, batch


# ---------------------------------------------------------------------------------------------- synthetic twins


def _synthetic_images(name: str, labels: np.ndarray, size: int, rng: np.random.Generator,
                      style: int = 0) -> np.ndarray:
    """Images whose class shows as a stripe angle and a blob layout, in a dataset-specific style.

    The class structure is mirror-symmetric (a chevron of two mirrored gratings, two mirrored blobs), so the
    horizontal flips and crops of the training augmentations keep an image's class, as they do for real scans.
    ``style`` picks the look (background, stripe frequency, tint) of a dataset; the same for any ``rng``.
    """
    info = get_dataset(name)
    # style 0 keeps the seed of the original twins, so their images (and md5s) are unchanged
    style_rng = np.random.default_rng([style, *name.encode()] if style else list(name.encode()))
    background = style_rng.uniform(40, 120)
    frequency = style_rng.uniform(2.0, 4.0)
    tint = style_rng.uniform(0.5, 1.0, size=3)
    n, c = len(labels), info.n_classes
    axis = (np.arange(size) + 0.5) / size - 0.5
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    angle = (np.pi / 2) * (labels + 0.5) / c + rng.normal(0, 0.03, n)
    cos, sin = np.cos(angle)[:, None, None], np.sin(angle)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (2, n, 1, 1))
    chevron = np.sin(2 * np.pi * frequency * (cos * xx + sin * yy) + phase[0])
    chevron += np.sin(2 * np.pi * frequency * (-cos * xx + sin * yy) + phase[1])
    # two mirrored blobs: their height and spread together code the class on a grid of 3 spreads x ceil(C/3) heights
    rows = max(-(-c // 3) - 1, 1)
    height = (0.6 * (labels // 3) / rows - 0.3 + rng.normal(0, 0.02, n))[:, None, None]
    spread = (0.08 + 0.13 * (labels % 3) + rng.normal(0, 0.015, n))[:, None, None]
    blobs = sum(np.exp(-((xx - side * spread) ** 2 + (yy - height) ** 2) / (2 * 0.07**2)) for side in (-1, 1))
    contrast = rng.uniform(0.6, 1.0, n)[:, None, None]
    grey = background + contrast * (25 * chevron + 80 * blobs) + rng.normal(0, 18, (n, size, size))
    image = grey if info.n_channels == 1 else grey[..., None] * tint + (1 - tint) * background
    return np.clip(image, 0, 255).astype(np.uint8)


def make_synthetic(
    name: str,
    size: int = 28,
    n_per_split: int | Mapping[str, int] = 200,
    seed: int = 0,
    root: str | Path = "data/raw",
    chunk: int = 1024,
    style: int = 0,
) -> Path:
    """Write a synthetic twin of ``name`` in the official npz format (keys, key order, dtypes, label shape).

    Labels are balanced over the classes and shuffled; images carry learnable class structure. The file's md5 goes
    into ``<root>/SYNTHETIC.json``, which ``ensure_npz`` checks instead of the official md5 (and never downloads).
    Images are generated and compressed in chunks, so a 224-px twin of a large split fits in little memory.
    ``style`` changes each dataset's look but not its class structure (``tiny-pretrained`` pretrains on another
    style than the benchmark's twins, the way a real backbone's pretraining images differ from MedMNIST's).
    """
    info = get_dataset(name)
    _check_size(size)
    counts = {s: n_per_split for s in SPLITS} if isinstance(n_per_split, int) else dict(n_per_split)
    if set(counts) != set(SPLITS) or min(counts.values()) < info.n_classes:
        raise ValueError(f"n_per_split needs train/val/test counts of at least {info.n_classes} each, got {counts}")
    path = npz_path(name, size, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, *name.encode()])
    labels = {s: rng.permutation(np.arange(counts[s]) % info.n_classes).astype(np.uint8) for s in SPLITS}
    image_shape = (size, size) if info.n_channels == 1 else (size, size, 3)
    # Official 28-px files list all image arrays first; MedMNIST+ files (64 px and up) pair images with labels.
    if size == 28:
        order = [f"{s}_images" for s in SPLITS] + [f"{s}_labels" for s in SPLITS]
    else:
        order = [f"{s}_{part}" for s in SPLITS for part in ("images", "labels")]
    tmp = path.with_suffix(".tmp.npz")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for key in order:
            split, part = key.split("_")
            with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
                if part == "labels":
                    np.lib.format.write_array(member, labels[split].reshape(-1, 1))
                    continue
                shape = (counts[split], *image_shape)
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                          "shape": shape}
                np.lib.format.write_array_header_1_0(member, header)
                for start in range(0, counts[split], chunk):
                    part_labels = labels[split][start : start + chunk].astype(np.int64)
                    member.write(_synthetic_images(name, part_labels, size, rng, style).tobytes())
    os.replace(tmp, path)
    manifest_path = path.parent / SYNTHETIC_MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest[path.name] = {"md5": file_md5(path), "dataset": name, "size": size, "seed": seed, "counts": counts,
                           "style": style}
    manifest_path.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path
