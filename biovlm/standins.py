"""Offline stand-ins for pretrained backbones: models of a known architecture built from a local config.

``biomedclip-random`` (BiomedCLIP's exact architecture, random weights: cost and memory benchmarks), ``tiny`` and
``tiny-clip`` (toy models of each text-tower kind, random weights: unit tests) and ``tiny-pretrained`` (``tiny``
contrastively pretrained on synthetic captioned images: the offline demo). ``tiny-pretrained`` is **shipped** with
the package (``resources/tiny-pretrained.safetensors``, sha256 pinned in ``resources/tiny-pretrained.json``), so every
machine runs the demo on the same weights; ``python -m biovlm.backbone tiny-pretrained --rebuild`` re-runs the recipe
and compares the result with the shipped file. The hub and open_clip loaders live in ``biovlm.backbone``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import inspect
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # biovlm.backbone imports this module for its registry
    from biovlm.backbone import Backbone

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_VIT = "biovlm_vit_tiny"  # registered with timm on first use (see _register_tiny_vit)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

# BiomedCLIP's open_clip config (the hub's open_clip_config.json), with the HF tower's BERT-base config beside it.
BIOMEDCLIP_ARCH: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
             "intermediate_size": 3072, "max_position_embeddings": 512},
}
# The same two-tower kind at toy size: a 2-block timm ViT on 32-px inputs and a 2-layer BERT (vocab from tiny_vocab).
TINY_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"timm_model_name": TINY_VIT, "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 32},
    "text_cfg": {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 128},
    "bert": {"vocab_size": None, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 256, "max_position_embeddings": 128,
             # no dropout: it only matters while pretraining, where it drowns a random tower's signal in noise
             "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}
# tiny's image tower with open_clip's native text transformer (CLIP BPE tokenizer, argmax/eot pooling).
TINY_CLIP_ARCH: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": TINY_ARCH["vision_cfg"],
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}
TINY_VIT_ARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 4, "mlp_ratio": 2.0}
_BERT_COMMON = {"model_type": "bert", "architectures": ["BertModel"], "hidden_act": "gelu",
                "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2,
                "layer_norm_eps": 1e-12, "pad_token_id": 0, "initializer_range": 0.02}

# tiny-pretrained: contrastive pretraining of `tiny` on synthetic twins of all 11 datasets (see pretrain_tiny).
# Images: twins in `styles` looks (background, stripe frequency, tint), none of them the benchmark's own look
# (style 0). One look alone lets the tower read that look's incidental cues (stripe frequency x angle), and its
# transfer to the benchmark's look swings with the seed and the CPU's floats, often below chance; two looks make
# it read the class structure (stripe angle, blob layout): the transfer is partial and stable over seeds; four
# transfer further but spread more (`python bench/tiny_recipe.py` measures this). Flips and crops (crop_scale).
# Captions per class and step: with context_p, random context words before the class name; with attribute_p,
# "<modality> of <class>, which has <attribute>" (a curated attribute); otherwise `caption` ("<class>."). The
# benchmark's hand template "a <modality> of <class>." is never a caption: its zero-shot accuracy is imperfect
# (the gap below), and prompt learners have a wording to learn, as CoOp learns over CLIP's hand prompts.
TINY_PRETRAIN: dict[str, Any] = {"seed": 0, "steps": 800, "text_warmup": 50, "batch_size": 128, "lr": 3e-3,
                                 "warmup": 25, "weight_decay": 0.05, "text_lr_scale": 1.0, "spread": 1.0,
                                 "context_p": 0.25, "context_words": 4, "attribute_p": 0.25, "caption": "{name}.",
                                 "styles": [1, 2], "crop_scale": [1.0, 1.0], "n_train": 256}
CACHE_FORMAT = 2
# The band every build of the recipe must land in, whatever its seed or machine (tested over three seeds):
# zero-shot on held-out twins of its own looks with its own caption (it learned its world), and on held-out twins
# of the benchmark's look with the hand template (it transfers, imperfectly: above chance, below its own world).
GAP_BAND = {"own_min": 0.85, "benchmark_above_chance": 0.15, "benchmark_below_own": 0.15}
GAP_TWINS = {"seed": 123, "n_test": 110}  # held-out twins of the gap measurement, never a pretraining image
SHIPPED_WEIGHTS = "tiny-pretrained.safetensors"
SHIPPED_MANIFEST = "tiny-pretrained.json"


class ShippedWeightsError(RuntimeError):
    """The shipped tiny-pretrained weights are missing, changed or damaged."""


# ---------------------------------------------------------------------------------------------- vocabulary


def _bert_words(texts: Sequence[str]) -> list[str]:
    """The words a lower-casing BERT tokenizer sees in ``texts`` (its own normaliser and pre-tokenizer)."""
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, pre = BertNormalizer(lowercase=True), BertPreTokenizer()
    return [w for text in texts for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(text))]


def registry_texts() -> list[str]:
    """Every fixed text of the benchmark: templates, attribute frames and context prompts of all 11 datasets."""
    from biovlm import data, prompts

    texts = []
    for info in data.DATASETS.values():
        for name in info.prompt_names:
            texts += [prompts.template_text(info, name), prompts.attribute_text(info, name, prompts.PLACEHOLDER),
                      prompts.context_prompt(name, 4)]
    return texts


def curated_attribute_texts() -> dict[str, list[list[str]]]:
    """Dataset -> per class, the attribute sentences of the shipped curated attributes (all of them)."""
    from biovlm import attributes, data, prompts

    out = {}
    for info in data.DATASETS.values():
        out[info.name] = [[prompts.attribute_text(info, name, a) for a in attrs]
                          for name, attrs in zip(info.prompt_names, attributes.curated(info.name), strict=True)]
    return out


def tiny_vocab(size: int | None = None) -> list[str]:
    """A deterministic WordPiece vocabulary: BERT specials, every printable character and its ``##`` form (so any
    text tokenizes), the placeholder word, every registry word and every word of the curated attributes; padded
    with ``[unusedN]`` up to ``size``."""
    from biovlm import prompts

    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]  # the tokenizer lower-cases first
    texts = registry_texts() + [t for per_class in curated_attribute_texts().values() for ts in per_class for t in ts]
    words = sorted(set(_bert_words(texts)))
    vocab = list(dict.fromkeys([*BERT_SPECIALS, *chars, *("##" + c for c in chars), prompts.PLACEHOLDER.lower(),
                                *words]))
    if size is not None:
        if size < len(vocab):
            raise ValueError(f"vocabulary size {size} is below the {len(vocab)} entries it must hold")
        vocab += [f"[unused{i}]" for i in range(size - len(vocab))]
    return vocab


# ---------------------------------------------------------------------------------------------- builders


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence open_clip's expected 'initialised randomly / no checkpoint' warnings of the offline builds."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _register_tiny_vit() -> None:
    """A 2-block timm ViT on 32-px inputs, registered by name so open_clip's timm adapter can build it."""
    import timm
    from timm.models import register_model

    if timm.is_model(TINY_VIT):
        return

    def biovlm_vit_tiny(pretrained: bool = False, **kwargs):
        from timm.models.vision_transformer import vit_tiny_patch16_224

        return vit_tiny_patch16_224(pretrained=False, **{**TINY_VIT_ARGS, **kwargs})

    biovlm_vit_tiny.__module__ = __name__
    register_model(biovlm_vit_tiny)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True))


def _build_local(arch: dict, seed: int = 0, vocab: list[str] | None = None):
    """Build an open_clip model and tokenizer from a config folder written here (no network, random weights).

    The HF text tower needs a local folder with a BERT ``config.json``, ``vocab.txt`` and ``tokenizer_config.json``;
    ``pretrained_text=False`` makes open_clip build it from that config instead of downloading weights.
    """
    import open_clip
    import torch

    _register_tiny_vit()
    model_cfg = {k: copy.deepcopy(v) for k, v in arch.items() if k != "bert"}
    with tempfile.TemporaryDirectory(prefix="biovlm-arch-") as tmp, _quiet(), torch.random.fork_rng(devices=[]):
        folder = Path(tmp)
        if "bert" in arch:
            vocab = vocab or tiny_vocab(arch["bert"]["vocab_size"])
            context = model_cfg["text_cfg"]["context_length"]
            (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
            _write_json(folder / "config.json", {**_BERT_COMMON, **arch["bert"], "vocab_size": len(vocab)})
            _write_json(folder / "tokenizer_config.json", {"tokenizer_class": "BertTokenizer", "do_lower_case": True,
                                                           "model_max_length": context})
            model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder))
        _write_json(folder / "open_clip_config.json",
                    {"model_cfg": model_cfg, "preprocess_cfg": {"mean": OPENAI_MEAN, "std": OPENAI_STD}})
        torch.manual_seed(seed)
        model = open_clip.create_model(f"local-dir:{folder}", pretrained_text=False)
        tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model, tokenizer



def local_builder(arch: dict) -> Callable:
    """A ``BACKBONES`` builder of a random-weight model of ``arch``."""
    return lambda cache_dir=None, device="cpu": (*_build_local(arch), {})


# ---------------------------------------------------------------------------------------------- tiny-pretrained


def recipe_key(config: dict | None = None) -> str:
    """A hash of everything that shapes tiny-pretrained's weights: architecture, recipe values, vocabulary, the
    texts and twins it reads, and the code of its loop (a seed or a source edit gives another key)."""
    from biovlm import data

    config = {**TINY_PRETRAIN, **(config or {})}
    blob = json.dumps({"format": CACHE_FORMAT, "arch": TINY_ARCH, "vit": TINY_VIT_ARGS, "bert": _BERT_COMMON,
                       "train": config, "vocab": tiny_vocab(), "captions": registry_texts(),
                       "attributes": curated_attribute_texts(),
                       "twins": inspect.getsource(data._synthetic_images) + inspect.getsource(data.make_synthetic),
                       "loop": inspect.getsource(_PRETRAIN_LOOP) + inspect.getsource(_caption)
                       + inspect.getsource(_crop_and_flip)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tiny_pretrained_path(config: dict | None = None, cache_dir: str | Path | None = None) -> Path:
    """Cache file of a recipe build (``--rebuild``, tests), keyed by ``recipe_key``."""
    from biovlm.backbone import default_cache_dir

    return Path(cache_dir or default_cache_dir()) / f"tiny-pretrained-{recipe_key(config)}.safetensors"


def _sha256(path: Path) -> str:
    from biovlm.data import file_hash

    return file_hash(path)


def save_weights(model, vocab: list[str], info: dict, path: Path) -> str:
    """Write a tiny-pretrained model (its vocabulary and build info as metadata) atomically; returns the sha256."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"info": json.dumps(info, sort_keys=True), "vocab": "\n".join(vocab),
                                         "format": str(CACHE_FORMAT)})
    os.replace(tmp, path)
    return _sha256(path)


def load_weights(path: Path):
    """``(model, tokenizer, info)`` of a file written by ``save_weights``: the vocabulary travels in the file, so
    later edits of the texts that shaped it (curated attributes, templates) cannot shift its token ids."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != str(CACHE_FORMAT):
        raise ShippedWeightsError(f"{path} is tiny-pretrained format {meta.get('format')}, this biovlm reads "
                                  f"format {CACHE_FORMAT}; rebuild it: python -m biovlm.backbone tiny-pretrained "
                                  f"--rebuild")
    model, tokenizer = _build_local(TINY_ARCH, vocab=meta["vocab"].split("\n"))
    model.load_state_dict(load_file(str(path)))
    return model, tokenizer, json.loads(meta["info"])


def shipped_path() -> Path:
    return Path(str(resources.files("biovlm").joinpath("resources", SHIPPED_WEIGHTS)))


def shipped_manifest() -> dict:
    return json.loads(resources.files("biovlm").joinpath("resources", SHIPPED_MANIFEST).read_text())


def load_shipped(device: str = "cpu"):
    """The demo's tiny-pretrained: the shipped weights, refused unless their sha256 is the pinned one."""
    path = shipped_path()
    fix = ("restore it (`git checkout -- biovlm/resources` in a clone, or reinstall biovlm), or rebuild and ship "
           "new weights with `python -m biovlm.backbone tiny-pretrained --rebuild --ship`")
    if not path.is_file() or not path.with_name(SHIPPED_MANIFEST).is_file():
        raise ShippedWeightsError(f"the shipped tiny-pretrained weights or their manifest are missing: {path} "
                                  f"(and {SHIPPED_MANIFEST} beside it); {fix}")
    manifest = shipped_manifest()
    actual = _sha256(path)
    if actual != manifest["sha256"]:
        raise ShippedWeightsError(f"{path} has sha256 {actual}, but {SHIPPED_MANIFEST} pins {manifest['sha256']}: "
                                  f"the shipped tiny-pretrained weights were changed or damaged; {fix}")
    model, tokenizer, info = load_weights(path)
    return model, tokenizer, {**info, "sha256": actual}


def build_tiny_pretrained(config: dict | None = None, cache_dir: str | Path | None = None, device: str = "cpu"):
    """Run the recipe (``TINY_PRETRAIN``, overridden by ``config``) or load its cached result: ``(model,
    tokenizer, info)``, ``info`` holding the build time, environment and the gap measurement."""
    import torch

    from biovlm import environment
    from biovlm.backbone import Backbone

    config = {**TINY_PRETRAIN, **(config or {})}
    path = tiny_pretrained_path(config, cache_dir)
    if path.exists():
        return load_weights(path)
    print(f"biovlm: building tiny-pretrained (seed {config['seed']}) -> {path}", file=sys.stderr, flush=True)
    model, tokenizer = _build_local(TINY_ARCH, seed=config["seed"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs many small ops: one thread is fastest (by far on a busy machine)
    try:
        info = pretrain_tiny(model, tokenizer, config, device=device)
        info["gap"] = measure_gap(Backbone("tiny-pretrained", model, tokenizer, device), config["styles"])
    finally:
        torch.set_num_threads(threads)
    info.update(recipe=recipe_key(config), config=config, machine=environment.machine(),
                packages=environment.package_versions())
    save_weights(model, tiny_vocab(TINY_ARCH["bert"]["vocab_size"]), info, path)
    return model, tokenizer, info


def _synthetic_twins(root: Path, n_train: int, n_test: int, seed: int, style: int = 0) -> None:
    from biovlm import data

    for info in data.DATASETS.values():
        counts = {"train": max(n_train, info.n_classes), "val": info.n_classes, "test": max(n_test, info.n_classes)}
        data.make_synthetic(info.name, 28, counts, seed=seed, root=root, style=style)


def zero_shot_accuracy(model: Backbone, dataset: str, root: str | Path, size: int = 28,
                       split: str = "test", batch_size: int = 256, text: Callable | None = None) -> float:
    """Zero-shot accuracy on one split, each class's text ``text(info, class name)`` (default: the hand template
    ``prompts.template_text``)."""
    import torch

    from biovlm import data, prompts

    info = data.get_dataset(dataset)
    text = text or prompts.template_text
    class_features = model.encode_texts([text(info, c) for c in info.prompt_names])
    images, labels = data.load_split(dataset, split, size, root)
    correct = 0
    for start, batch in data.iter_batches(images, batch_size):
        pred = (model.encode_images(model.prepare_images(batch)) @ class_features.T).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(labels[start : start + len(batch)])).sum())
    return correct / len(labels)


def measure_gap(model: Backbone, styles: Sequence[int], caption: str | None = None) -> dict:
    """Zero-shot accuracy (mean over the 11 datasets) on held-out twins: ``own`` in the pretraining looks with the
    pretraining caption, ``benchmark`` in the benchmark's look (style 0) with the hand template."""
    from biovlm import data

    caption = caption or TINY_PRETRAIN["caption"]
    own, bench = [], {}
    with tempfile.TemporaryDirectory(prefix="biovlm-gap-") as tmp:
        for style in [*styles, 0]:
            root = Path(tmp) / f"style{style}"
            _synthetic_twins(root, n_train=0, n_test=GAP_TWINS["n_test"], seed=GAP_TWINS["seed"], style=style)
            for name in data.DATASETS:
                if style == 0:
                    bench[name] = round(zero_shot_accuracy(model, name, root), 4)
                else:
                    own.append(zero_shot_accuracy(model, name, root, text=lambda i, c: caption.format(name=c)))
    chance = float(np.mean([1 / info.n_classes for info in data.DATASETS.values()]))
    return {"own": round(float(np.mean(own)), 4), "benchmark": round(float(np.mean(list(bench.values()))), 4),
            "chance": round(chance, 4), "benchmark_per_dataset": bench}


def band_violations(gap: dict) -> list[str]:
    """Which of ``GAP_BAND``'s conditions a gap measurement breaks (empty: inside the band)."""
    own, bench, chance = gap["own"], gap["benchmark"], gap["chance"]
    out = []
    if own < GAP_BAND["own_min"]:
        out.append(f"own-look zero-shot {own:.3f} < {GAP_BAND['own_min']}")
    if bench < chance + GAP_BAND["benchmark_above_chance"]:
        out.append(f"benchmark zero-shot {bench:.3f} < chance {chance:.3f} + {GAP_BAND['benchmark_above_chance']}")
    if bench > own - GAP_BAND["benchmark_below_own"]:
        out.append(f"benchmark zero-shot {bench:.3f} > own {own:.3f} - {GAP_BAND['benchmark_below_own']}")
    return out


def pretrain_tiny(model, tokenizer, config: dict, device: str = "cpu", log: Callable | None = None) -> dict:
    """Contrastive pretraining of a tiny model in place; returns ``{"seconds", "final_loss"}``.

    Data: synthetic twins of all 11 datasets in each of ``config["styles"]`` looks, cropped and flipped,
    captioned by ``_caption``. Loss: InfoNCE of each image against the captions of all 78 classes (in-batch CLIP
    loss would see the same caption many times per batch, as false negatives), plus a caption *spread* term,
    InfoNCE of the captions against each other: a random BERT gives every caption nearly the same CLS feature
    (cosine ~1), so captions of one dataset, one word apart, would give the images nothing to tell classes apart
    by; the spread term breaks that tie (alone for ``text_warmup`` steps, then beside the image loss).
    Deterministic for its seed on one machine and package set; other CPUs give other floats (hence the shipped file).
    """
    import torch
    import torch.nn.functional as F

    from biovlm import data
    from biovlm.backbone import Backbone

    start_time = time.perf_counter()
    seed = int(config["seed"])
    bb = Backbone("tiny-pretrained", model, tokenizer, device)  # borrows preprocessing, the prompt path
    with tempfile.TemporaryDirectory(prefix="biovlm-twins-") as tmp:
        # Twins under seeds of their own: never the same images as a demo run's twins (seed 0 and up).
        for style in config["styles"]:
            _synthetic_twins(Path(tmp) / f"style{style}", config["n_train"], 0, seed=1_000_003 + seed + 7 * style,
                             style=style)
        images, targets, captions, names, attribute_texts = [], [], [], [], []
        sentences = curated_attribute_texts()
        for info in data.DATASETS.values():
            for style in config["styles"]:
                x, y = data.load_split(info.name, "train", 28, Path(tmp) / f"style{style}")
                images.append(bb.prepare_images(x))
                targets.append(torch.from_numpy(y) + len(captions))
            captions += [config["caption"].format(name=c) for c in info.prompt_names]
            names += info.prompt_names
            attribute_texts += sentences[info.name]
    images, targets = torch.cat(images), torch.cat(targets).to(bb.device)
    itself = torch.arange(len(captions), device=bb.device)
    words = sorted(set(_bert_words(registry_texts())) - set(".,-()'"))

    model.train().requires_grad_(True)
    groups = []
    for module, scale in ((model.visual, 1.0), (model.text, config["text_lr_scale"])):
        for decay in (True, False):
            params = [p for p in module.parameters() if (p.ndim >= 2) == decay]
            groups.append({"params": params, "weight_decay": config["weight_decay"] * decay, "scale": scale})
    groups.append({"params": [model.logit_scale], "weight_decay": 0.0, "scale": 1.0})
    opt = torch.optim.AdamW(groups, lr=config["lr"])
    steps, warmup, text_steps = int(config["steps"]), int(config["warmup"]), int(config["text_warmup"])
    gen = torch.Generator().manual_seed(seed)
    for step in range(-text_steps, steps):  # negative steps: captions only
        factor = (1.0 if step < 0 else (step + 1) / warmup if step < warmup else
                  0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup))))
        for group in opt.param_groups:
            group["lr"] = config["lr"] * factor * group["scale"]
        scale = model.logit_scale.exp().clamp(max=100)
        texts = [_caption(caption, name, attrs, words, config, gen)
                 for caption, name, attrs in zip(captions, names, attribute_texts, strict=True)]
        ids, mask = bb.tokenize(texts)
        txt = F.normalize(bb._text.encode(bb.token_embeddings(ids), mask), dim=-1)
        loss = config["spread"] * F.cross_entropy(scale * txt @ txt.T, itself)
        if step >= 0:
            batch = torch.randint(len(images), (config["batch_size"],), generator=gen).to(bb.device)
            img = F.normalize(model.encode_image(_crop_and_flip(images[batch], config["crop_scale"], gen)), dim=-1)
            loss = loss + F.cross_entropy(scale * img @ txt.T, targets[batch])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log is not None and step % 50 == 0:
            log(f"tiny-pretrained step {step}/{steps} loss {loss.item():.3f}")
    model.eval().requires_grad_(False)
    return {"seconds": round(time.perf_counter() - start_time, 1), "final_loss": round(loss.item(), 4)}


def _caption(caption: str, name: str, attribute_texts: list[str], words: list[str], config: dict, gen) -> str:
    """One class's caption for one step. Random context words ("w w w w <class>.") teach the tower to read the
    class in any context, so learned prompt contexts have a smooth tower to tune; attribute sentences give the
    attribute teachers (zero-shot attribute ensemble, BioVLM, BiomedCoOp) something to say."""
    import torch

    draw = float(torch.rand((), generator=gen))
    if draw < config["context_p"]:
        picks = torch.randint(len(words), (config["context_words"],), generator=gen)
        return " ".join([*(words[int(i)] for i in picks), f"{name}."])
    if draw < config["context_p"] + config["attribute_p"]:
        return attribute_texts[int(torch.randint(len(attribute_texts), (), generator=gen))]
    return caption


def _crop_and_flip(images, scale, gen):
    """Random resized crops (area fraction in ``scale``) and horizontal flips of a normalised image batch, each
    image its own draw, reproducible from ``gen``."""
    import kornia.augmentation as K
    import torch

    transform = torch.nn.Sequential(K.RandomResizedCrop(tuple(images.shape[-2:]), scale=tuple(scale)),
                                    K.RandomHorizontalFlip())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(2**62, (), generator=gen)))
        return transform(images)


_PRETRAIN_LOOP = pretrain_tiny  # its source is part of the recipe key (a patched pretrain_tiny in a test keeps it)


def weight_difference(a, b) -> float:
    """Largest absolute difference between two models' weights (same architecture)."""
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) for k in sa)


def rebuild(seed: int | None = None, cache_dir: str | Path | None = None, ship: bool = False,
            out: Callable[[str], None] = print) -> dict:
    """``--rebuild``: run the recipe, compare the result with the shipped weights (hash, weights, gap, band);
    with ``ship``, replace the shipped file and its manifest by the new build."""
    config = {} if seed is None else {"seed": seed}
    model, _, info = build_tiny_pretrained(config, cache_dir)
    path = tiny_pretrained_path(config, cache_dir)
    new_sha, gap = _sha256(path), info["gap"]
    out(f"rebuilt tiny-pretrained (seed {info['config']['seed']}, {info['seconds']} s) -> {path}")
    out(f"{'':10} {'own look':>9} {'benchmark':>10} {'chance':>7}")
    try:
        shipped_model, _, shipped = load_shipped()
    except ShippedWeightsError as error:  # nothing valid to compare with: still allowed to ship
        out(f"no shipped weights to compare with: {error}")
        shipped_model, shipped = None, {"sha256": None, "gap": None}
    old = shipped["gap"]
    if old:
        out(f"{'shipped':10} {old['own']:9.3f} {old['benchmark']:10.3f} {old['chance']:7.3f}")
    out(f"{'rebuilt':10} {gap['own']:9.3f} {gap['benchmark']:10.3f} {gap['chance']:7.3f}")
    same = new_sha == shipped["sha256"]
    diff = 0.0 if same or shipped_model is None else weight_difference(model, shipped_model)
    if shipped_model is not None:
        out(f"weights: {'identical to' if same else 'differ from'} the shipped file (sha256 {new_sha[:16]} vs "
            f"{shipped['sha256'][:16]}; largest weight difference {diff:.3g})")
    violations = band_violations(gap)
    out("band: " + ("inside " + json.dumps(GAP_BAND) if not violations else "OUTSIDE: " + "; ".join(violations)))
    if ship:
        target = shipped_path()
        target.write_bytes(path.read_bytes())
        manifest = {"sha256": new_sha, "recipe": info["recipe"], "gap": gap, "config": info["config"],
                    "built": {"seconds": info["seconds"], "machine": info["machine"], "packages": info["packages"]}}
        (target.parent / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        out(f"shipped: {target} and {SHIPPED_MANIFEST} now hold this build")
    return {"sha256": new_sha, "identical": same, "max_weight_difference": diff, "gap": gap,
            "shipped_gap": old, "band_violations": violations}
