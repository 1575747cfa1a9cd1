"""Frozen open_clip vision-language models behind one small interface: images in, text prompts in, features out.

Every model is an open_clip model, so BiomedCLIP (timm ViT + Hugging Face BERT text tower) and the OpenAI-style CLIPs
(open_clip's native causal text transformer) share one code path. A prompt learner uses the *prompt path*:
``tokenize`` -> ``token_embeddings`` -> overwrite some positions -> ``encode_text_embeddings``. That path equals the
model's own ``encode_text`` (tested), and it runs on ids truncated to the batch's longest real sequence, which gives
the same features as padding to the context length (256 for BiomedCLIP) at a fraction of the cost: a BERT masks
padding out of attention, and a causal transformer's real tokens never attend to later (padding) positions.

Names (see ``BACKBONES``): ``biomedclip`` (real weights from the Hugging Face hub), ``biomedclip-random`` (the same
architecture, random weights, offline), ``tiny`` / ``tiny-clip`` (small random models of each text-tower kind, for
tests), ``tiny-pretrained`` (``tiny`` contrastively trained offline on synthetic captioned images, cached on disk),
and any ``"<open_clip arch>/<pretrained tag>"`` pair such as ``"ViT-B-16/openai"``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # its text tower and tokenizer
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

# tiny-pretrained: contrastive training on synthetic twins of all 11 datasets (see pretrain_tiny).
# Captions per class and step: the template, else (context_p) random context words before the class name, else
# (attribute_p) "<modality> of <class>, which has <attribute>" with one of the class's curated attributes.
# The twins are drawn in another look (style) than the benchmark's own, so the demo has a domain gap to adapt to;
# images are randomly flipped and cropped (area fraction crop_scale, aspect ratio 3/4 to 4/3, then resized back).
TINY_PRETRAIN: dict[str, Any] = {"seed": 0, "steps": 800, "text_warmup": 50, "batch_size": 128, "lr": 3e-3,
                                 "warmup": 25, "weight_decay": 0.05, "text_lr_scale": 1.0, "spread": 1.0,
                                 "context_p": 0.25, "context_words": 4, "attribute_p": 0.25, "style": 1,
                                 "crop_scale": [1.0, 1.0], "n_train": 256, "n_test": 110}
CACHE_FORMAT = 1


class BackboneUnavailableError(RuntimeError):
    """Pretrained weights are neither in the local cache nor downloadable."""


def default_cache_dir() -> Path:
    """Where built models are cached: ``$BIOVLM_CACHE`` or ``~/.cache/biovlm``."""
    return Path(os.environ.get("BIOVLM_CACHE") or Path.home() / ".cache" / "biovlm")


# ---------------------------------------------------------------------------------------------- the interface


class Backbone:
    """A frozen open_clip model (eval mode, no parameter gradients) with the prompt path of its text tower.

    Not an ``nn.Module`` on purpose: a method that keeps ``self.backbone = backbone`` does not adopt the frozen
    towers as submodules, so its ``.train()``, ``.parameters()`` and ``state_dict()`` never reach them.
    """

    def __init__(self, name: str, model, tokenizer, device: str = "cpu", info: dict | None = None):
        import torch

        self.name = name
        self.device = torch.device(device)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.info = dict(info or {})
        self._text = _text_tower(model)
        size = model.visual.image_size
        self.image_size = int(size if isinstance(size, int) else size[0])
        cfg = model.visual.preprocess_cfg
        self.mean = tuple(float(v) for v in cfg["mean"])
        self.std = tuple(float(v) for v in cfg["std"])
        self.embed_dim = self._text.output_dim
        self.text_width = self._text.width
        self.context_length = int(tokenizer.context_length)
        self.logit_scale = float(model.logit_scale.detach().exp())

    def __repr__(self) -> str:
        return (f"Backbone({self.name!r}, image_size={self.image_size}, embed_dim={self.embed_dim}, "
                f"text_width={self.text_width}, context_length={self.context_length}, device={self.device})")

    # images -----------------------------------------------------------------------------------------------
    def images_to_unit(self, images_uint8: np.ndarray):
        """uint8 ``[B,H,W]`` or ``[B,H,W,3]`` -> float ``[B,3,H,W]`` in [0, 1] (grey repeated to 3 channels)."""
        import torch

        x = torch.from_numpy(np.array(images_uint8, dtype=np.uint8)).to(self.device).float().div_(255)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        return x.contiguous()

    def resize(self, x):
        """Bicubic resize of ``[B,3,h,w]`` [0, 1] images to the input size, clamped back into [0, 1]."""
        import torch.nn.functional as F

        if x.shape[-2:] == (self.image_size, self.image_size):
            return x
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return x.clamp_(0, 1)  # bicubic overshoots; PIL's uint8 resize clips the same way

    def normalize(self, x):
        """The backbone's own mean/std normalisation of ``[B,3,S,S]`` [0, 1] images."""
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def prepare_images(self, images_uint8: np.ndarray):
        """uint8 ``[B,H,W(,3)]`` -> normalised float ``[B,3,S,S]`` (bicubic resize, grey -> 3 channels)."""
        return self.normalize(self.resize(self.images_to_unit(images_uint8)))

    def encode_images(self, x):
        """``[B,3,S,S]`` normalised images -> L2-normalised ``[B,D]`` float32 features (no grad; bf16 on CUDA)."""
        import torch
        import torch.nn.functional as F

        on_cuda = self.device.type == "cuda"
        with torch.no_grad(), torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_cuda):
            features = self.model.encode_image(x.to(self.device))
        return F.normalize(features.float(), dim=-1)

    # text -------------------------------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]):
        """``(ids [N,L] long, attention_mask [N,L] long)``, cut to the longest real sequence in the batch."""
        if isinstance(texts, str):
            raise TypeError("tokenize takes a list of texts, not one string")
        ids = self.tokenizer(list(texts))
        mask = (ids != self._text.pad_id).long()
        if self._text.truncates:
            n = int(mask.sum(1).max())
            ids, mask = ids[:, :n], mask[:, :n]
        return ids.to(self.device), mask.to(self.device)

    def token_embeddings(self, ids):
        """``[N,L]`` ids -> ``[N,L,W]`` word embeddings only (the encoder adds position/type embeddings)."""
        return self._text.token_embeddings(ids.to(self.device))

    def encode_text_embeddings(self, embeds, attention_mask):
        """``[N,L,W]`` token embeddings -> L2-normalised ``[N,D]``; differentiable w.r.t. ``embeds``."""
        import torch.nn.functional as F

        return F.normalize(self._text.encode(embeds, attention_mask.to(embeds.device)), dim=-1)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 256):
        """L2-normalised ``[N,D]`` features of constant texts (no grad), each batch truncated on its own."""
        import torch

        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of texts, not one string")
        texts = list(texts)
        chunks = []
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                ids, mask = self.tokenize(texts[start : start + batch_size])
                chunks.append(self.encode_text_embeddings(self.token_embeddings(ids), mask))
        return torch.cat(chunks) if chunks else torch.zeros(0, self.embed_dim, device=self.device)


# ---------------------------------------------------------------------------------------------- text towers


class _HFText:
    """open_clip's HFTextEncoder (BiomedCLIP's BERT): ``inputs_embeds`` replace the word-embedding lookup."""

    def __init__(self, tower):
        self.tower = tower
        self.pad_id = int(tower.config.pad_token_id)
        self.width = tower.transformer.get_input_embeddings().embedding_dim
        self.output_dim = int(tower.output_dim)
        self.truncates = True  # padding is masked out of attention, positions are absolute

    def token_embeddings(self, ids):
        return self.tower.transformer.get_input_embeddings()(ids)

    def encode(self, embeds, mask):
        out = self.tower.transformer(inputs_embeds=embeds, attention_mask=mask)
        return self.tower.proj(self.tower.pooler(out, mask))


def _pool_at_last_real(x, mask):
    """The end-of-text position: the last real token (what ``argmax`` of CLIP BPE ids or the eos id finds)."""
    import torch

    return x[torch.arange(x.shape[0], device=x.device), mask.sum(1) - 1]


_NATIVE_POOLS: dict[str, Callable] = {
    "argmax": _pool_at_last_real,
    "eos": _pool_at_last_real,
    "first": lambda x, mask: x[:, 0],
    "last": lambda x, mask: x[:, -1],
}


class _NativeText:
    """open_clip's own text transformer, held either by a ``TextTransformer`` or (class ``CLIP``) the model itself."""

    def __init__(self, tower):
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise ValueError("text towers with an appended class token or a padding mask (CoCa-style) are not "
                             "supported; pick a CLIP-style model such as 'ViT-B-16/openai'")
        self.tower = tower
        self.pool = getattr(tower, "pool_type", None) or tower.text_pool_type
        if self.pool not in _NATIVE_POOLS:
            raise ValueError(f"text pooling {self.pool!r} is not supported (supported: {', '.join(_NATIVE_POOLS)})")
        self.pad_id = int(getattr(tower, "pad_id", 0))
        self.width = tower.token_embedding.embedding_dim
        proj = tower.text_projection
        self.output_dim = int(proj.out_features if hasattr(proj, "out_features") else
                              proj.shape[1] if proj is not None else self.width)
        # Causal attention: real tokens never see the padding after them, so cutting it off changes nothing. A
        # bidirectional tower (SigLIP-style, pooling the last position) attends to its padding: keep it whole.
        self.truncates = tower.attn_mask is not None and self.pool != "last"

    def token_embeddings(self, ids):
        return self.tower.token_embedding(ids)

    def encode(self, embeds, mask):
        t, n = self.tower, embeds.shape[1]
        x = embeds + t.positional_embedding[:n].to(embeds.dtype)
        attn = t.attn_mask[:n, :n] if t.attn_mask is not None else None
        x = t.ln_final(t.transformer(x, attn_mask=attn))
        x = _NATIVE_POOLS[self.pool](x, mask)
        if t.text_projection is None:
            return x
        return t.text_projection(x) if hasattr(t.text_projection, "out_features") else x @ t.text_projection


def _text_tower(model) -> _HFText | _NativeText:
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    return _HFText(text) if isinstance(text, HFTextEncoder) else _NativeText(text if text is not None else model)


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


def _download_help(what: str, repos: Sequence[str], error: Exception) -> BackboneUnavailableError:
    commands = " and ".join(f"`hf download {r}` (older clients: `huggingface-cli download {r}`)" for r in repos)
    return BackboneUnavailableError(
        f"could not load {what}: model id {repos[0]} is not in the local Hugging Face cache and could not be "
        f"downloaded ({type(error).__name__}: {error}). Pre-download it on a machine with network access: "
        f"{commands}, into the same cache (HF_HOME, or the cache_dir passed to load_backbone); then set "
        f"HF_HUB_OFFLINE=1 to load it from the cache without network. For an offline run without those weights use "
        f"'biomedclip-random' (same architecture) or 'tiny-pretrained'."
    )


def _build_hub(name: str, cache_dir: str | Path | None = None):
    """A model from the Hugging Face hub through open_clip (``hf-hub:<id>``), e.g. BiomedCLIP."""
    import open_clip

    model_id = name.removeprefix("hf-hub:")
    repos = [model_id, BIOMEDBERT_ID] if model_id == BIOMEDCLIP_ID else [model_id]
    cache = str(cache_dir) if cache_dir is not None else None
    try:
        model = open_clip.create_model(f"hf-hub:{model_id}", cache_dir=cache)
        tokenizer = open_clip.get_tokenizer(f"hf-hub:{model_id}", cache_dir=cache)
    except Exception as error:  # network, missing cache entries and hub errors all end here
        raise _download_help(f"hf-hub:{model_id}", repos, error) from error
    return model, tokenizer


def _build_open_clip_pair(name: str, cache_dir: str | Path | None = None):
    """``"<arch>/<tag>"``: an open_clip architecture with one of its pretrained tags, e.g. ``ViT-B-16/openai``."""
    import open_clip

    arch, tag = name.split("/", 1)
    if arch not in open_clip.list_models():
        raise ValueError(f"unknown open_clip architecture {arch!r} in {name!r}; see open_clip.list_models()")
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag not in tags:
        raise ValueError(f"open_clip has no pretrained tag {tag!r} for {arch}; its tags: {', '.join(tags)}")
    hub_id = (open_clip.get_pretrained_cfg(arch, tag).get("hf_hub") or "").strip("/")
    try:
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=str(cache_dir) if cache_dir else None)
    except Exception as error:
        raise _download_help(name, [hub_id or f"{arch}/{tag}"], error) from error
    return model, open_clip.get_tokenizer(arch)


def tiny_pretrained_path(config: dict | None = None, cache_dir: str | Path | None = None) -> Path:
    """Cache file of a tiny-pretrained build, keyed by a hash of everything that shapes its weights."""
    import inspect

    from biovlm import data

    config = {**TINY_PRETRAIN, **(config or {})}
    # Everything that shapes the weights, including how the synthetic twins and their captions are made.
    blob = json.dumps({"format": CACHE_FORMAT, "arch": TINY_ARCH, "vit": TINY_VIT_ARGS, "bert": _BERT_COMMON,
                       "train": config, "vocab": tiny_vocab(), "captions": registry_texts(),
                       "attributes": curated_attribute_texts(),
                       "twins": inspect.getsource(data._synthetic_images) + inspect.getsource(data.make_synthetic),
                       "loop": inspect.getsource(_PRETRAIN_LOOP) + inspect.getsource(_caption)
                       + inspect.getsource(_crop_and_flip)}, sort_keys=True)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"tiny-pretrained-{key}.safetensors"


def build_tiny_pretrained(config: dict | None = None, cache_dir: str | Path | None = None, device: str = "cpu"):
    """``tiny`` after contrastive pretraining: loaded from the cache, or trained once (about a minute on a CPU)
    and cached. ``config`` overrides ``TINY_PRETRAIN`` entries (tests use fewer steps). Returns the builder triple
    ``(model, tokenizer, info)``; ``info`` holds the build time and zero-shot accuracies."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    config = {**TINY_PRETRAIN, **(config or {})}
    path = tiny_pretrained_path(config, cache_dir)
    model, tokenizer = _build_local(TINY_ARCH, seed=config["seed"])
    if path.exists():
        with safe_open(str(path), "pt") as f:
            info = json.loads(f.metadata()["info"])
        model.load_state_dict(load_file(str(path)))
        return model, tokenizer, info
    print(f"biovlm: building tiny-pretrained once (contrastive pretraining on synthetic data) -> {path}",
          file=sys.stderr, flush=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model runs many small ops: one thread is fastest (by far on a busy machine)
    try:
        info = pretrain_tiny(model, tokenizer, config, device=device)
    finally:
        torch.set_num_threads(threads)
    print(f"biovlm: tiny-pretrained built in {info['seconds']} s, mean zero-shot accuracy "
          f"{info['mean_zero_shot_accuracy']:.3f} (chance {info['mean_chance']:.3f})", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp), metadata={"info": json.dumps(info), "format": str(CACHE_FORMAT)})
    os.replace(tmp, path)  # atomic; a concurrent builder writes the same weights
    return model, tokenizer, info


def _local_builder(arch: dict) -> Callable:
    return lambda cache_dir=None, device="cpu": (*_build_local(arch), {})


BACKBONES: dict[str, Callable] = {
    "biomedclip": lambda cache_dir=None, device="cpu": (*_build_hub(BIOMEDCLIP_ID, cache_dir), {}),
    "biomedclip-random": _local_builder(BIOMEDCLIP_ARCH),
    "tiny": _local_builder(TINY_ARCH),
    "tiny-clip": _local_builder(TINY_CLIP_ARCH),
    "tiny-pretrained": lambda cache_dir=None, device="cpu": build_tiny_pretrained(None, cache_dir, device),
}
"""Backbone name -> builder ``(cache_dir, device) -> (open_clip model, tokenizer, info dict)``."""


def load_backbone(name: str, device: str = "cpu", cache_dir: str | Path | None = None) -> Backbone:
    """A frozen backbone by name: a ``BACKBONES`` entry, ``"<open_clip arch>/<pretrained tag>"`` or ``hf-hub:<id>``.

    ``cache_dir``: for hub weights the Hugging Face cache to use (default: HF's own); for ``tiny-pretrained`` where
    the trained weights are cached (default: ``$BIOVLM_CACHE`` or ``~/.cache/biovlm``).
    """
    if name in BACKBONES:
        model, tokenizer, info = BACKBONES[name](cache_dir=cache_dir, device=device)
    elif name.startswith("hf-hub:"):
        (model, tokenizer), info = _build_hub(name, cache_dir), {}
    elif name.count("/") == 1 and all(name.split("/")):
        (model, tokenizer), info = _build_open_clip_pair(name, cache_dir), {}
    else:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}, any "
                         f"'<open_clip arch>/<pretrained tag>' such as 'ViT-B-16/openai', or 'hf-hub:<model id>'")
    return Backbone(name, model, tokenizer, device=device, info=info)


# ---------------------------------------------------------------------------------------------- tiny-pretrained


def _synthetic_twins(root: Path, n_train: int, n_test: int, seed: int, style: int = 0) -> None:
    from biovlm import data

    for info in data.DATASETS.values():
        counts = {"train": max(n_train, info.n_classes), "val": info.n_classes, "test": max(n_test, info.n_classes)}
        data.make_synthetic(info.name, 28, counts, seed=seed, root=root, style=style)


def zero_shot_accuracy(backbone: Backbone, dataset: str, root: str | Path, size: int = 28,
                       split: str = "test", batch_size: int = 256) -> float:
    """Accuracy of hand-template zero-shot classification (``prompts.template_text``) on one split."""
    import torch

    from biovlm import data, prompts

    info = data.get_dataset(dataset)
    text = backbone.encode_texts([prompts.template_text(info, c) for c in info.prompt_names])
    images, labels = data.load_split(dataset, split, size, root)
    correct = 0
    for start, batch in data.iter_batches(images, batch_size):
        pred = (backbone.encode_images(backbone.prepare_images(batch)) @ text.T).argmax(1).cpu()
        correct += int((pred == torch.from_numpy(labels[start : start + len(batch)])).sum())
    return correct / len(labels)


def pretrain_tiny(model, tokenizer, config: dict, device: str = "cpu", log: Callable | None = None) -> dict:
    """Contrastive pretraining of a tiny model in place; returns build info (seconds, zero-shot accuracies).

    Data: synthetic twins of all 11 datasets (seed ``config["seed"]``, look ``config["style"]``), cropped and
    flipped, captioned by ``_caption`` (the template, random context words, or an attribute sentence).
    Loss: InfoNCE of each image against the captions of all 78 classes (in-batch CLIP loss would see the same caption
    many times per batch, as false negatives), plus a caption *spread* term, InfoNCE of the captions against each
    other: a random BERT gives every caption nearly the same CLS feature (cosine ~1), so captions of one dataset,
    one word apart, would give the images nothing to tell classes apart by; the spread term breaks that tie (alone
    for ``text_warmup`` steps, then beside the image loss). Deterministic for its seed on one machine.
    """
    import torch
    import torch.nn.functional as F

    from biovlm import data, prompts

    start_time = time.perf_counter()
    seed = int(config["seed"])
    bb = Backbone("tiny-pretrained", model, tokenizer, device)  # borrows preprocessing and the prompt path
    with tempfile.TemporaryDirectory(prefix="biovlm-twins-") as tmp:
        root = Path(tmp)
        # Twins under a seed of their own: never the same images as a demo run's twins (seed 0 and up).
        _synthetic_twins(root, config["n_train"], config["n_test"], seed=1_000_003 + seed, style=config["style"])
        images, targets, captions, names, attribute_texts = [], [], [], [], []
        sentences = curated_attribute_texts()
        for info in data.DATASETS.values():
            x, y = data.load_split(info.name, "train", 28, root)
            images.append(bb.prepare_images(x))
            targets.append(torch.from_numpy(y) + len(captions))
            captions += [prompts.template_text(info, c) for c in info.prompt_names]
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
        bb = Backbone("tiny-pretrained", model, tokenizer, device)
        accuracy = {name: zero_shot_accuracy(bb, name, root) for name in data.DATASETS}
    chance = [1 / info.n_classes for info in data.DATASETS.values()]
    return {"config": config, "seconds": round(time.perf_counter() - start_time, 1),
            "final_loss": round(loss.item(), 4), "zero_shot_test_accuracy": accuracy,
            "mean_zero_shot_accuracy": float(np.mean(list(accuracy.values()))), "mean_chance": float(np.mean(chance))}


def _caption(template: str, name: str, attribute_texts: list[str], words: list[str], config: dict, gen) -> str:
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
    return template


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


_PRETRAIN_LOOP = pretrain_tiny  # its source is part of the cache key (a patched pretrain_tiny in a test keeps it)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m biovlm.backbone [name ...]``: build or fetch backbones into their caches ahead of a run (the
    demo's ``tiny-pretrained`` is pretrained once, a few CPU-minutes; hub models are downloaded)."""
    import argparse

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("names", nargs="*", default=["tiny-pretrained"], help="backbone names (default: tiny-pretrained)")
    ap.add_argument("--cache-dir", default=None, help="tiny-pretrained: $BIOVLM_CACHE or ~/.cache/biovlm; hub: HF's")
    args = ap.parse_args(argv)
    for name in args.names:
        t0 = time.perf_counter()
        model = load_backbone(name, cache_dir=args.cache_dir)
        print(f"{model} ready in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
