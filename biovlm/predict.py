"""Apply a trained run to new images and write one CSV row per image: ``python -m biovlm.predict``.

Inputs: a folder of PNG/JPEG files (subfolders included), an ``.npz`` in MedMNIST layout (``<split>_images``,
``<split>_labels``) or a split of a dataset as ``params.yaml`` configures it (``data.root``, ``data.size``). Images
are prepared as the run's own were: brought to the run's image size and channels (Pillow, bicubic) when they differ,
then ``biovlm.features.encode_batch`` (the features stage's code for test images) with the run's normalisation, and
classified by ``biovlm.train.predict``. So the test split a run was evaluated on gives exactly the probabilities of
its evaluation. The run file records the image size, normalisation and backbone weights
(``biovlm.runs.image_record``); a bare method checkpoint does not, and then ``--size``/``--normalize`` apply.

Output: ``predictions/<method>/<setting>/<dataset>/k<K>_seed<S>/<input>.csv`` (``--out`` to choose) with the
columns ``image`` (file path in the folder, or index in the split), ``p_<class>`` for each class (summing to 1),
``predicted`` (the most probable class) and, when the input has labels, ``label`` (the true class).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from biovlm import data, storage

PREDICTIONS_DIR = Path("predictions")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_NORMALIZE = "imagenet"  # biovlm.features.ViewTransform's default: what a checkpoint without a record means


@dataclass
class Images:
    """Images to classify, read batch by batch (never all at once)."""

    name: str  # names the default output file
    ids: list  # one identifier per image: its path in the folder, or its index in the split
    batches: Callable[[int], Iterator[list[np.ndarray]]]  # batch size -> lists of uint8 [H,W] or [H,W,3] images
    labels: np.ndarray | None = None  # true label ids, when the input has them

    def __len__(self) -> int:
        return len(self.ids)


def folder_images(folder: str | Path) -> Images:
    """The PNG and JPEG files under ``folder`` (subfolders too), in path order."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder} holds no PNG or JPEG image (*.png, *.jpg, *.jpeg, subfolders included); "
                         f"point --images at the folder that holds them")

    def batches(batch_size: int) -> Iterator[list[np.ndarray]]:
        for start in range(0, len(files), batch_size):
            yield [read_image(f) for f in files[start : start + batch_size]]

    return Images(folder.name, [f.relative_to(folder).as_posix() for f in files], batches)


def read_image(path: Path) -> np.ndarray:
    """One image file as uint8 ``[H,W]`` (grey) or ``[H,W,3]``; an unreadable file is a ValueError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):  # Pillow would clip them to 0..255
                raise ValueError(f"image {path} has {image.mode} pixels (more than 8 bits); convert it to 8-bit "
                                 f"grey or colour first (windowed as the training images were)")
            return np.asarray(image.convert("L" if image.mode in ("1", "L", "LA") else "RGB"))
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"cannot read image {path} ({type(error).__name__}: {error}); fix or remove the "
                         f"file") from None


def _array_images(name: str, images: np.ndarray, labels: np.ndarray | None) -> Images:
    def batches(batch_size: int) -> Iterator[list[np.ndarray]]:
        for _, batch in data.iter_batches(images, batch_size):
            yield list(batch)

    return Images(name, list(range(len(images))), batches, labels)


def npz_images(path: str | Path, split: str = "test") -> Images:
    """Split ``split`` of an ``.npz`` in MedMNIST layout (``<split>_images`` uint8 ``[N,H,W(,3)]``, and
    ``<split>_labels`` when it has labels)."""
    import zipfile

    path = Path(path)
    _check_split(split)
    if not path.is_file():
        raise FileNotFoundError(f"npz file {path} does not exist")
    try:
        with np.load(path) as npz:
            key = f"{split}_images"
            if key not in npz.files:
                raise ValueError(f"{path} has no {key!r} array (it holds {', '.join(npz.files) or 'none'}); an .npz in "
                                 f"MedMNIST layout holds <split>_images and <split>_labels: choose --split")
            images = npz[key]
            labels = npz[f"{split}_labels"] if f"{split}_labels" in npz.files else None
    except (OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"cannot read {path} as an .npz file ({type(error).__name__}: {error})") from None
    if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
        raise ValueError(f"{path}: {key} is {images.dtype} {list(images.shape)}; MedMNIST layout is uint8 "
                         f"[N,H,W] (grey) or [N,H,W,3] (colour)")
    if labels is not None:
        if labels.size != len(images):
            raise ValueError(f"{path}: {split}_labels has shape {list(labels.shape)}, not one label per image "
                             f"({len(images)}); multi-label files are not supported")
        labels = labels.reshape(-1).astype(np.int64)
    return _array_images(f"{path.stem}-{split}", images, labels)


def split_images(params: str | Path, dataset: str, split: str = "test") -> Images:
    """Split ``split`` of ``dataset`` where ``params`` (a params.yaml) keeps it (``data.root``, ``data.size``,
    ``data.synthetic``), as the download stage left it."""
    from biovlm.config import load_config, npz_location

    _check_split(split)
    data.get_dataset(dataset)  # an unknown name fails here, naming the valid ones
    cfg = load_config(params)
    where = npz_location(cfg, dataset)
    if not where.npz.exists():
        raise FileNotFoundError(f"{where.npz} does not exist; run the download stage first (dvc repro "
                                f"download@{dataset}) or give the file with --npz")
    images, labels = data.load_split(dataset, split, cfg["data"]["size"], where.npz.parent, cache=where.cache)
    return _array_images(f"{dataset}-{split}", images, labels)


def _check_split(split: str) -> None:
    if split not in data.SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(data.SPLITS)}")


def conform(image: np.ndarray, size: int, grey: bool) -> np.ndarray:
    """uint8 ``image`` at ``size`` x ``size`` pixels (Pillow bicubic, antialiased), grey ``[S,S]`` or colour
    ``[S,S,3]`` as the run's images were; returned as it is when it already is."""
    from PIL import Image

    if image.shape[:2] != (size, size):
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
    if grey and image.ndim == 3:
        image = np.asarray(Image.fromarray(image).convert("L"))
    elif not grey and image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)  # what the backbone does to a grey image anyway
    return image


def image_features(backbone, images: Images, size: int, grey: bool, normalize: str = DEFAULT_NORMALIZE,
                   batch_size: int = 64, progress: bool = True):
    """[N, D] float32 features of ``images``, made as the features stage makes test features (float16 there,
    so here too): each image conformed to ``size`` and ``grey`` (:func:`conform`), then ``encode_batch``."""
    import torch
    from tqdm import tqdm

    from biovlm.features import ViewTransform, encode_batch

    normalizer = ViewTransform(normalize=normalize).normalizer(backbone)
    out = []
    for batch in tqdm(images.batches(batch_size), total=math.ceil(len(images) / batch_size), unit="batch",
                      desc=f"{images.name}: {len(images)} images", disable=None if progress else True,
                      file=sys.stderr):  # None: a bar on a terminal, none in a log file
        out.append(encode_batch(backbone, np.stack([conform(x, size, grey) for x in batch]), normalizer))
    return torch.cat(out).float()


def prediction_table(probs, class_names: Sequence[str], ids: Sequence, labels: Sequence[str] | None = None):
    """One row per image: ``image``, ``p_<class>`` for each class, ``predicted`` and (with ``labels``) ``label``."""
    import pandas as pd

    probs = np.asarray(probs, dtype=np.float64)
    table = pd.DataFrame({"image": list(ids)})
    for i, name in enumerate(class_names):
        table[f"p_{name}"] = probs[:, i]
    table["predicted"] = [class_names[i] for i in probs.argmax(axis=1)]
    if labels is not None:
        table["label"] = list(labels)
    return table


def parse_classes(value: str) -> list[str]:
    """``--classes``: a text file (one class per line) or names separated by commas."""
    path = Path(value)
    if path.is_file():
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not names:
            raise ValueError(f"class file {path} is empty; write one class name per line")
        return names
    if path.suffix in (".txt", ".csv") or "/" in value:
        raise FileNotFoundError(f"class file {path} does not exist; give a file with one class per line or the "
                                f"names separated by commas")
    return [name.strip() for name in value.split(",") if name.strip()]


def default_output(checkpoint: str | Path, run: dict, method: str, images: Images) -> Path:
    """``predictions/<method>/<run name>/<input>.csv`` (a run file) or ``predictions/<method>/<file stem>/...``."""
    from biovlm.runs import Run

    where = Run(**run["run"]).name if isinstance(run.get("run"), dict) else Path(checkpoint).stem
    return PREDICTIONS_DIR / method / where / f"{images.name}.csv"


def write_table(table, out: str | Path) -> None:
    text = table.to_csv(index=False)
    storage.atomic_write(Path(out), lambda tmp: tmp.write_text(text), len(text), f"writing {Path(out).name}")


# ---------------------------------------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m biovlm.predict", description="Apply a trained run to new images "
                                 "and write one CSV row per image: the probability of each class and the prediction.",
                                 epilog="Details: docs/predict.md")
    ap.add_argument("checkpoint", help="a run file of the train stage (checkpoints/<dataset>/<method>/<setting>/"
                                       "<dataset>/k<K>_seed<S>.pt) or a saved Method.checkpoint()")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", metavar="DIR", help="a folder of PNG/JPEG images (subfolders included)")
    source.add_argument("--npz", metavar="FILE", help="an .npz in MedMNIST layout (<split>_images, <split>_labels)")
    source.add_argument("--dataset", metavar="NAME", help="a MedMNIST dataset, read where --params keeps it (its "
                                                          "classes are the default class list)")
    ap.add_argument("--split", default="test", help="--npz, --dataset: the split to classify: train, val or test "
                                                    "(default: test)")
    ap.add_argument("--params", default="params.yaml", help="--dataset: the params.yaml that says where the data is "
                                                            "(default: params.yaml)")
    ap.add_argument("--classes", metavar="LIST|FILE", help="classes to choose from: names separated by commas "
                    "(\"a,b,c\") or a text file with one name per line (default: the run's own classes)")
    ap.add_argument("--out", metavar="CSV", help="where to write the predictions (default: predictions/<method>/"
                                                 "<setting>/<dataset>/k<K>_seed<S>/<input>.csv)")
    ap.add_argument("--backbone", help="backbone name (default: the one named in the checkpoint); another name "
                                       "is accepted only when the run file records that it has the same weights")
    ap.add_argument("--cache-dir", help="where hub weights are cached (default: Hugging Face's own cache)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available; default: auto)")
    ap.add_argument("--batch-size", type=int, default=64, help="images per image-tower batch (default: 64)")
    ap.add_argument("--size", type=int, help="image size the images are brought to first (default: the run's, "
                                             "else the backbone's input size)")
    ap.add_argument("--normalize", choices=("imagenet", "backbone"), help="image normalisation (default: the "
                    f"run's, else {DEFAULT_NORMALIZE})")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    return ap


def main(argv: Sequence[str] | None = None) -> Path:
    """Predict, write the CSV and return its path."""
    from biovlm.backbone import load_backbone
    from biovlm.checkpoints import load_method, read_checkpoint
    from biovlm.config import resolve_device
    from biovlm.train import predict

    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be a positive number of images, got {args.batch_size}")
    if args.size is not None and args.size < 1:
        raise ValueError(f"--size must be a positive number of pixels, got {args.size}")
    # everything that can be checked without the backbone first: a bad input fails in a second, not after loading
    state, run, where = read_checkpoint(args.checkpoint)
    meta, record = state["meta"], run.get("features") or {}
    run_info = data.DatasetInfo.from_meta(meta["info"])
    if args.images:
        images = folder_images(args.images)
    elif args.npz:
        images = npz_images(args.npz, args.split)
    else:
        images = split_images(args.params, args.dataset, args.split)
    label_info = run_info if not args.dataset else data.get_dataset(  # whose label ids the input's labels are
        args.dataset, run_info.class_names, run_info.attribute_template, run_info.hand_template)
    if args.classes:
        info = data.custom_dataset(parse_classes(args.classes), like=run_info)
        names = list(info.prompt_names)
    elif args.dataset and args.dataset != run_info.name:
        info, names = label_info, list(label_info.prompt_names)  # another dataset: its own classes
    else:
        info, names = run_info, list(meta["class_names"])
        if len(names) < 2:
            raise ValueError(f"{where} was trained on one class {names}, and a classifier needs two; give the "
                             f"classes to choose from with --classes")
    labels = None
    if images.labels is not None:
        bad = sorted({int(v) for v in images.labels if not 0 <= v < label_info.n_classes})
        if bad:
            raise ValueError(f"{images.name} has label ids {bad[:5]}, but {label_info.name} has "
                             f"{label_info.n_classes} classes; is it an .npz of {label_info.name}?")
        labels = [label_info.prompt_names[v] for v in images.labels]

    backbone = load_backbone(args.backbone or meta["backbone"], device=resolve_device(args.device),
                             cache_dir=args.cache_dir)
    weights = record.get("weights_sha256")  # a run file's record: another backbone name is fine with these weights
    if weights and backbone.fingerprint != weights:
        raise ValueError(f"the weights of backbone {backbone.name!r} (sha256 {backbone.fingerprint[:12]}) are not the "
                         f"ones {where} was trained with ({meta['backbone']!r}, sha256 {weights[:12]}); load "
                         f"those weights (--cache-dir, or drop --backbone)")
    method = load_method(args.checkpoint, backbone, same_weights=bool(weights))  # read again: messages name the file
    known = dict(zip(method.class_names, method.attributes or [], strict=False))  # test-time attributes (own classes)
    attributes = [known[n] for n in names] if info.name == run_info.name and all(n in known for n in names) else None

    size = args.size or record.get("size") or backbone.image_size
    normalize = args.normalize or (record.get("transform") or {}).get("normalize") or DEFAULT_NORMALIZE
    grey = run_info.n_channels == 1  # the run's images: grey or colour
    out = Path(args.out) if args.out else default_output(args.checkpoint, run, method.name, images)
    print(f"predict: {method.name} of {where} on {len(images)} images ({images.name}); {len(names)} classes; "
          f"backbone {backbone.name} on {backbone.device}, images at {size} px, {'grey' if grey else 'colour'}, "
          f"{normalize} normalisation{'' if record or args.normalize else ' (not recorded: --normalize to change)'}")
    features = image_features(backbone, images, size, grey, normalize, args.batch_size, not args.quiet)
    probs = predict(method, features, names, info, attributes).numpy()
    write_table(prediction_table(probs, names, images.ids, labels), out)
    print(f"predict: wrote {out} ({len(images)} rows)")
    return out


if __name__ == "__main__":
    from biovlm.config import stage_main

    stage_main("predict", main, exit_code=2)  # one line, exit 2, no traceback; BIOVLM_DEBUG=1 shows it
