"""Frozen image features of one dataset, computed once and cached in one safetensors file.

Prompt learning only trains text-side tensors, so the image tower runs exactly once per image and view:

- ``test``: every test image (shared by every method, seed, shot count and setting);
- ``val``: the validation shots (union over seeds of ``min(max_shots, 4)`` per class);
- the few-shot ``pool``: the union over seeds of the nested ``max_shots``-shot training sets, once without
  augmentation (``pool_clean``) and as ``views`` augmented view *tuples* per image: ``plain`` (random resized crop
  + flip: the training transform), and ``weak`` (flip) and ``strong`` (flip, colour jitter with probability
  ``jitter_p``, Gaussian blur with probability ``blur_p``) applied to that same crop, as the public BioVLM code
  builds its teacher views from the student's augmented image. The defaults (``ViewTransform``) are the
  public code's: Dassl's crop scale (0.08, 1), jitter p 0.8, blur p 0.5 with a 3-pixel kernel, ImageNet mean/std.

Every random parameter of image ``i``'s view ``v`` comes from a generator keyed by (``features.seed``, ``i``,
``v``, family, transform), never from a stream over the pool: an image's views are the same whichever seeds (and so
whichever pool) are configured, and a run's result depends on its own shots only.

Images go uint8 -> [0, 1] -> bicubic resize to the tower's input size -> augmentation -> mean/std normalisation
(``normalize``: ImageNet's, as the public code's ``PIXEL_MEAN/STD``, or the backbone's own).
Colour jitter works on [0, 1] images, so it runs before normalisation (the public reference applies it after
normalisation, which corrupts the strong view). Test images stream through the data layer's memory-mapped batches,
so memory stays bounded whatever the split size. Every value in the file's metadata is JSON; ``load_features``
refuses a file made for another backbone, image size, view count or transform instead of mixing features.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from biovlm import data, sampling, storage

FORMAT_VERSION = 4  # 2: view tuples keyed by (seed, image, view); 3: the transform; 4: one metadata entry
META_KEY = "biovlm"  # the whole metadata as one sorted JSON string: safetensors writes a multi-key metadata map in
                     # a per-process order, so the same features gave different file bytes (and reran everything)
FAMILIES = ("plain", "weak", "strong")
# Image normalisations by name: (mean, std) per channel, or None for the backbone's own.
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),  # torchvision's; the public code's PIXEL_MEAN/STD
    "backbone": None,
}


@dataclass(frozen=True)
class ViewTransform:
    """How images become tower inputs; the defaults are the public BioVLM code's (Dassl + its strong view)."""

    normalize: str = "imagenet"
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random resized crop: area fraction range (Dassl's default)
    jitter_p: float = 0.8  # strong view: probability of colour jitter (brightness/contrast/saturation 0.4, hue 0.1)
    blur_p: float = 0.5  # strong view: probability of Gaussian blur (sigma in (0.1, 2))
    blur_kernel: int = 3  # Gaussian blur kernel size in pixels (odd)

    def __post_init__(self) -> None:
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"features.normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")
        low, high = self.crop_scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"features.crop_scale must be [low, high] with 0 < low <= high <= 1, got "
                             f"{list(self.crop_scale)}")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"features.blur_kernel must be an odd number of pixels, got {self.blur_kernel}")

    @classmethod
    def from_config(cls, features_cfg: dict) -> ViewTransform:
        """The ``features`` section's transform knobs (absent ones take the defaults)."""
        known = {k: features_cfg[k] for k in ("normalize", "jitter_p", "blur_p", "blur_kernel") if k in features_cfg}
        if "crop_scale" in features_cfg:
            known["crop_scale"] = tuple(float(v) for v in features_cfg["crop_scale"])
        return cls(**known)

    def meta(self) -> dict:
        """The transform as the feature file's metadata records it (JSON values)."""
        return {**asdict(self), "crop_scale": list(self.crop_scale)}

    def normalizer(self, backbone):
        """A function [0, 1] images -> normalised tower inputs."""
        stats = NORMALIZATIONS[self.normalize]
        if stats is None:
            return backbone.normalize

        def normalize(x: torch.Tensor) -> torch.Tensor:
            mean, std = (x.new_tensor(v).view(1, 3, 1, 1) for v in stats)
            return (x - mean) / std

        return normalize


@dataclass
class FeatureSet:
    """The cached features of one dataset (float32 tensors on the CPU)."""

    meta: dict
    test_features: torch.Tensor
    test_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    train_labels: np.ndarray
    val_indices: np.ndarray  # val-split index of each row of val_features
    val_split_labels: np.ndarray  # labels of the whole val split (for a run's own validation shots)
    pool_indices: np.ndarray
    pool_labels: torch.Tensor
    pool_clean: torch.Tensor
    pool_views: dict[str, torch.Tensor]

    def shots(self, seed: int, k: int, classes: Sequence[int] | None = None) -> np.ndarray:
        """Pool positions of the ``k``-shot training set of ``seed`` (optionally only the given label ids)."""
        if seed not in self.meta["seeds"] or k > self.meta["max_shots"]:
            raise ValueError(
                f"{self.meta['dataset']} features hold shots for seeds {self.meta['seeds']} up to "
                f"K={self.meta['max_shots']}, not seed {seed} with K={k}; rerun the features stage with them"
            )
        return _rows(sampling.few_shot_indices(self.train_labels, k, seed), self.train_labels, classes,
                     self.pool_indices, "few-shot set outside the cached pool")

    def val_shots(self, seed: int, k: int, classes: Sequence[int] | None = None) -> np.ndarray:
        """Rows of ``val_features`` holding the validation shots of a ``k``-shot run of ``seed``
        (``data.val_shot_indices``: min(k, 4) per class), optionally only the given label ids."""
        if seed not in self.meta["seeds"]:
            raise ValueError(f"{self.meta['dataset']} features hold validation shots for seeds {self.meta['seeds']}, "
                             f"not seed {seed}; rerun the features stage with it")
        return _rows(sampling.val_shot_indices(self.val_split_labels, k, seed), self.val_split_labels, classes,
                     self.val_indices, "validation shots outside the cached ones")


def _rows(chosen: np.ndarray, split_labels: np.ndarray, classes: Sequence[int] | None, cached: np.ndarray,
          what: str) -> np.ndarray:
    """Rows of the sorted ``cached`` split indices holding ``chosen`` (only those of ``classes``, if given)."""
    if classes is not None:
        chosen = chosen[np.isin(split_labels[chosen], np.asarray(classes))]
    rows = np.searchsorted(cached, chosen)
    assert np.array_equal(cached[rows], chosen), what
    return rows


def _augmenters(transform: ViewTransform) -> dict:
    """The three view families after the crop: kornia augmentations, applied in batches with keyed parameters."""
    import kornia.augmentation as K

    k = transform.blur_kernel
    return {
        "plain": torch.nn.Sequential(K.RandomHorizontalFlip()),  # after the random resized crop (crop_box)
        "weak": torch.nn.Sequential(K.RandomHorizontalFlip()),
        "strong": torch.nn.Sequential(K.RandomHorizontalFlip(),
                                      K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=transform.jitter_p),
                                      K.RandomGaussianBlur((k, k), (0.1, 2.0), p=transform.blur_p)),
    }


def view_key(seed: int, image: int, view: int, family: int) -> np.random.SeedSequence:
    """The randomness of one family of one view of one image: a function of these numbers alone."""
    return np.random.SeedSequence([seed, image, view, family])


def crop_box(rng: np.random.Generator, size: int, scale: tuple[float, float] = ViewTransform.crop_scale,
             ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> list[list[int]]:
    """A random resized crop's corners (x, y; clockwise from top left), sampled as torchvision and kornia do:
    area fraction in ``scale``, log-uniform aspect ratio, 10 tries, else the whole image."""
    for _ in range(10):
        area = size * size * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < w <= size and 0 < h <= size:
            x, y = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
            break
    else:
        x, y, w, h = 0, 0, size, size
    return [[x, y], [x + w - 1, y], [x + w - 1, y + h - 1], [x, y + h - 1]]


def _augment_keyed(images: torch.Tensor, transform: torch.nn.Sequential, keys: Sequence[int]) -> torch.Tensor:
    """Apply ``transform`` to ``images`` [B,3,S,S] in one batched call per augmentation, image b's parameters
    drawn under the torch seed ``keys[b]``."""
    drawn = []
    for key in keys:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key)
            drawn.append([aug.forward_parameters(torch.Size([1, *images.shape[1:]])) for aug in transform])
    out = images
    for t, aug in enumerate(transform):
        first = drawn[0][t]
        params = {k: torch.cat([d[t][k] for d in drawn]) for k in first if k not in ("forward_input_shape", "order")}
        params["forward_input_shape"] = torch.tensor(out.shape)
        if "order" in first:  # colour jitter: one fixed order (brightness, contrast, saturation, hue) for all
            params["order"] = torch.arange(len(first["order"]))
        out = aug(out, params=params)
    return out.clamp(0, 1)


def view_tuples(unit_images: torch.Tensor, indices: Sequence[int], view: int, seed: int, size: int,
                transform: ViewTransform = ViewTransform()) -> dict:
    """View ``view`` of each image (split index ``indices[b]``): {"plain", "weak", "strong"} [B,3,S,S] in [0, 1]."""
    from kornia.geometry.transform import crop_and_resize

    keys = {f: [view_key(seed, int(i), view, k) for i in indices] for k, f in enumerate(FAMILIES)}
    torch_keys = {f: [int(ss.generate_state(1, np.uint64)[0] >> 1) for ss in keys[f]] for f in FAMILIES}
    boxes = torch.tensor([crop_box(np.random.default_rng(ss), unit_images.shape[-1], transform.crop_scale)
                          for ss in keys["plain"]],
                         dtype=unit_images.dtype)
    cropped = crop_and_resize(unit_images, boxes, (size, size), mode="bilinear", align_corners=True)
    augmenters = _augmenters(transform)
    plain = _augment_keyed(cropped.clamp(0, 1), augmenters["plain"], torch_keys["plain"])
    return {"plain": plain, "weak": _augment_keyed(plain, augmenters["weak"], torch_keys["weak"]),
            "strong": _augment_keyed(plain, augmenters["strong"], torch_keys["strong"])}


def encode_batch(backbone, images: np.ndarray, normalize) -> torch.Tensor:
    """[B, D] float16 CPU features of uint8 images ``[B,H,W]`` or ``[B,H,W,3]``, made as the test images' are:
    [0, 1], bicubic resize to the tower's input size, ``normalize`` (``ViewTransform.normalizer``), image tower.
    ``biovlm.predict`` classifies new images through this function too."""
    return backbone.encode_images(normalize(backbone.resize(backbone.images_to_unit(images)))).cpu().half()


def _encode(backbone, unit_images: torch.Tensor, batch_size: int, normalize) -> torch.Tensor:
    """Features of [0, 1] images in batches of exactly ``batch_size`` (the last one padded): a one-image batch
    takes other kernels than a full one, and an image's features must not depend on which others share the pool."""
    out = []
    for i in range(0, len(unit_images), batch_size):
        batch = unit_images[i : i + batch_size]
        padded = torch.cat([batch, batch[-1:].expand(batch_size - len(batch), *batch.shape[1:])])
        out.append(backbone.encode_images(normalize(padded)).cpu()[: len(batch)])
    return torch.cat(out)


def _union(indices: Sequence[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(indices)).astype(np.int64)


def _file_bytes(n_test: int, n_val: int, n_val_split: int, n_train: int, n_pool: int, views: int, dim: int) -> int:
    """The size of a feature file before it is computed (``storage.estimated_bytes`` of its tensors, with float32
    encoder outputs: an upper bound)."""
    nbytes = {"test_features": 2 * n_test * dim, "test_labels": 8 * n_test, "val_features": 4 * n_val * dim,
              "val_labels": 8 * n_val, "val_indices": 8 * n_val, "val_split_labels": 8 * n_val_split,
              "train_labels": 8 * n_train, "pool_indices": 8 * n_pool, "pool_labels": 8 * n_pool,
              "pool_clean": 4 * n_pool * dim, **{f"pool_{f}": 2 * n_pool * views * dim for f in FAMILIES}}
    return sum(nbytes.values()) + storage.MARGIN_BYTES + storage.MARGIN_PER_ARRAY * len(nbytes)


def extract_features(dataset: str, backbone, *, root: str | Path, size: int, views: int, seeds: Sequence[int],
                     max_shots: int = 16, batch_size: int = 64, out: str | Path, seed: int = 0,
                     transform: ViewTransform = ViewTransform(), cache: str | Path | None = None) -> Path:
    """Compute and store the features of ``dataset`` (see the module docstring); returns ``out``. The npz is read
    from ``root``, its arrays extracted into ``cache`` (default ``root``; see ``data.load_split``)."""
    from safetensors.torch import save_file

    info = data.get_dataset(dataset)
    if views < 1:
        raise ValueError(f"features.views must be at least 1, got {views}")
    seeds = [int(s) for s in seeds]
    normalize = transform.normalizer(backbone)
    train_images, train_labels = data.load_split(dataset, "train", size, root, cache=cache)
    val_images, val_labels = data.load_split(dataset, "val", size, root, cache=cache)
    too_many = f"features.max_shots (the feature pool holds that many per class; {dataset}'s train split is smaller)"
    pool = _union([sampling.few_shot_indices(train_labels, max_shots, s, knob=too_many) for s in seeds])
    val = _union([sampling.val_shot_indices(val_labels, max_shots, s) for s in seeds])

    test_images, test_labels = data.load_split(dataset, "test", size, root, cache=cache)
    out = Path(out)
    storage.remove_stale_temporaries(out.parent, recursive=False)
    storage.check_free(out.parent, _file_bytes(len(test_labels), len(val), len(val_labels), len(train_labels),
                                               len(pool), views, backbone.embed_dim),
                       f"writing {out.name}")  # before the encoding (hours for a large split), not after
    test = torch.empty(len(test_images), backbone.embed_dim, dtype=torch.float16)
    # progress bars on a terminal only (disable=None): in a log file a bar is a line stuck at 0%
    for start, batch in tqdm(data.iter_batches(test_images, batch_size), desc=f"{dataset} test",
                             total=-(-len(test_images) // batch_size), leave=False, disable=None):
        test[start : start + len(batch)] = encode_batch(backbone, batch, normalize)

    val_features = _encode(backbone, backbone.resize(backbone.images_to_unit(val_images[val])), batch_size,
                            normalize)
    pool_unit = backbone.resize(backbone.images_to_unit(train_images[pool])).cpu()
    tensors = {
        "test_features": test, "test_labels": torch.from_numpy(test_labels),
        "val_features": val_features, "val_labels": torch.from_numpy(val_labels[val]),
        "val_indices": torch.from_numpy(val), "val_split_labels": torch.from_numpy(val_labels),
        "train_labels": torch.from_numpy(train_labels),
        "pool_indices": torch.from_numpy(pool), "pool_labels": torch.from_numpy(train_labels[pool]),
        "pool_clean": _encode(backbone, pool_unit, batch_size, normalize),
    }
    per_view: dict[str, list[torch.Tensor]] = {f: [] for f in FAMILIES}
    for v in tqdm(range(views), desc=f"{dataset} views", leave=False, disable=None):
        chunks: dict[str, list[torch.Tensor]] = {f: [] for f in FAMILIES}
        for start in range(0, len(pool), batch_size):
            stop = start + batch_size
            tuples = view_tuples(pool_unit[start:stop], pool[start:stop], v, seed, backbone.image_size, transform)
            for family, images in tuples.items():
                chunks[family].append(_encode(backbone, images, batch_size, normalize))
        for family in FAMILIES:
            per_view[family].append(torch.cat(chunks[family]))
    for family in FAMILIES:
        tensors[f"pool_{family}"] = torch.stack(per_view[family], dim=1).half()  # [P, V, D]

    meta = {"format": FORMAT_VERSION, "dataset": dataset, "backbone": backbone.name, "size": size, "views": views,
            "seeds": seeds, "max_shots": max_shots, "embed_dim": backbone.embed_dim, "n_classes": info.n_classes,
            "seed": seed, "weights_sha256": backbone.fingerprint, "transform": transform.meta()}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(meta, sort_keys=True)}
    # an interrupted or failed write never leaves a half-written feature file, nor replaces a good one
    storage.atomic_write(out, lambda tmp: save_file(tensors, str(tmp), metadata=metadata),
                         storage.estimated_bytes(tensors), f"writing {out.name}")
    return out


class FeatureFileError(ValueError):
    """A feature file that cannot be read: truncated, overwritten or not a feature file at all."""


def _damaged(path: str | Path, reason: str) -> FeatureFileError:
    return FeatureFileError(f"{path} is damaged ({reason}); rerun the features stage (dvc repro features)")


def read_meta(path: str | Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.metadata() or {}
            if META_KEY in stored:
                return json.loads(stored[META_KEY])
            return {k: json.loads(v) for k, v in stored.items()}  # format 3 and older: one entry per key
    except SafetensorError as error:
        raise _damaged(path, f"safetensors: {error}") from None
    except ValueError as error:  # metadata that is not JSON
        raise _damaged(path, f"metadata: {error}") from None


def load_features(path: str | Path, expect: dict | None = None) -> FeatureSet:
    """Load a feature file, refusing one whose metadata differs from ``expect`` (key by key) and a damaged one
    (``FeatureFileError``, naming the file and the stage to rerun)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"feature file {path} is missing; run the features stage (dvc repro features)")
    meta = read_meta(path)
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path} has feature format {meta.get('format')}, this code reads {FORMAT_VERSION}; "
                         f"rerun the features stage")
    for key, wanted in (expect or {}).items():
        if meta.get(key) != wanted:
            raise ValueError(f"{path} was made with {key}={meta.get(key)!r}, but {key}={wanted!r} is asked for; "
                             f"rerun the features stage so features are never mixed")
    try:
        t = load_file(str(path))
    except SafetensorError as error:
        raise _damaged(path, f"safetensors: {error}") from None
    return FeatureSet(
        meta=meta,
        test_features=t["test_features"].float(), test_labels=t["test_labels"].long(),
        val_features=t["val_features"].float(), val_labels=t["val_labels"].long(),
        train_labels=t["train_labels"].numpy(), val_indices=t["val_indices"].numpy(),
        val_split_labels=t["val_split_labels"].numpy(), pool_indices=t["pool_indices"].numpy(),
        pool_labels=t["pool_labels"].long(), pool_clean=t["pool_clean"].float(),
        pool_views={f: t[f"pool_{f}"].float() for f in FAMILIES},
    )
