"""Frozen open_clip vision-language models behind one small interface: images in, text prompts in, features out.

Every model is an open_clip model, so BiomedCLIP (timm ViT + Hugging Face BERT text tower) and the OpenAI-style CLIPs
(open_clip's native causal text transformer) share one code path. A prompt learner uses the *prompt path*:
``tokenize`` -> ``token_embeddings`` -> overwrite some positions -> ``encode_text_embeddings``. That path equals the
model's own ``encode_text`` (tested), and it runs on ids truncated to the batch's longest real sequence, which gives
the same features as padding to the context length (256 for BiomedCLIP) at a fraction of the cost: a BERT masks
padding out of attention, and a causal transformer's real tokens never attend to later (padding) positions.

Names (see ``BACKBONES``): ``biomedclip`` (real weights from the Hugging Face hub), ``biomedclip-random`` (the same
architecture, random weights, offline), ``tiny`` / ``tiny-clip`` (small random models of each text-tower kind, for
tests), ``tiny-pretrained`` (``tiny`` contrastively pretrained offline on synthetic captioned images, shipped with
the package), any ``"<open_clip arch>/<pretrained tag>"`` pair such as ``"ViT-B-16/openai"`` and ``hf-hub:<id>``.
The offline stand-ins are built in ``biovlm.standins``.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path

import numpy as np

from biovlm import hub, standins
from biovlm.hub import BackboneUnavailableError

BIOMEDCLIP_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
BIOMEDBERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"  # its text tower and tokenizer


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

    @cached_property
    def fingerprint(self) -> str:
        """sha256 of the weights (every tensor of the state dict: name, dtype, shape, bytes, in name order): which
        weights made a number, comparable across machines and file formats."""
        import torch

        digest = hashlib.sha256()
        for key, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
            digest.update(t.view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

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
        model = open_clip.create_model(arch, pretrained=tag, cache_dir=str(cache_dir) if cache_dir else None,
                                       require_pretrained=True)
    except Exception as error:
        repo = hub_id or f"{arch}/{tag}"
        raise BackboneUnavailableError(
            f"could not load {name} ({type(error).__name__}: {str(error)[:200]}); searched the cache "
            f"{hub.cache_folder(cache_dir)}. Fetch it on a connected machine (`hf download {repo}`), copy the cache "
            f"over and point backbone.cache_dir (or HF_HOME) at it") from error
    return model, open_clip.get_tokenizer(arch)


BACKBONES: dict[str, Callable] = {
    "biomedclip": lambda cache_dir=None, device="cpu": hub.build(BIOMEDCLIP_ID, cache_dir),
    "biomedclip-random": standins.local_builder(standins.BIOMEDCLIP_ARCH),
    "tiny": standins.local_builder(standins.TINY_ARCH),
    "tiny-clip": standins.local_builder(standins.TINY_CLIP_ARCH),
    "tiny-pretrained": lambda cache_dir=None, device="cpu": standins.load_shipped(device),
}
"""Backbone name -> builder ``(cache_dir, device) -> (open_clip model, tokenizer, info dict)``."""


def load_backbone(name: str, device: str = "cpu", cache_dir: str | Path | None = None) -> Backbone:
    """A frozen backbone by name: a ``BACKBONES`` entry, ``"<open_clip arch>/<pretrained tag>"`` or ``hf-hub:<id>``.

    ``cache_dir``: for hub weights the Hugging Face cache to use (default: HF's own). ``tiny-pretrained`` is the
    shipped file (sha256-checked); rebuilds of its recipe go to ``$BIOVLM_CACHE`` or ``~/.cache/biovlm``.
    """
    if name in BACKBONES:
        model, tokenizer, info = BACKBONES[name](cache_dir=cache_dir, device=device)
    elif name.startswith("hf-hub:"):
        model, tokenizer, info = hub.build(name.removeprefix("hf-hub:"), cache_dir)
    elif name.count("/") == 1 and all(name.split("/")):
        (model, tokenizer), info = _build_open_clip_pair(name, cache_dir), {}
    else:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}, any "
                         f"'<open_clip arch>/<pretrained tag>' such as 'ViT-B-16/openai', or 'hf-hub:<model id>'")
    return Backbone(name, model, tokenizer, device=device, info=info)



def main(argv: Sequence[str] | None = None) -> None:
    """``python -m biovlm.backbone [name ...]``: load backbones ahead of a run (hub models are downloaded into
    their cache); ``tiny-pretrained --rebuild`` re-runs the demo model's recipe and compares it with the shipped
    weights."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m biovlm.backbone", description=main.__doc__)
    ap.add_argument("names", nargs="*", default=["tiny-pretrained"], help="backbone names (default: tiny-pretrained)")
    ap.add_argument("--cache-dir", default=None, help="hub models: the Hugging Face cache (default: HF's own); "
                    "--rebuild: where the build goes (default: $BIOVLM_CACHE or ~/.cache/biovlm)")
    ap.add_argument("--rebuild", action="store_true", help="tiny-pretrained: run its recipe (about a CPU-minute) "
                    "and compare the result with the shipped weights")
    ap.add_argument("--seed", type=int, default=None, help="--rebuild: the recipe's seed (default: the shipped one)")
    ap.add_argument("--ship", action="store_true", help="--rebuild: replace the shipped weights and manifest")
    args = ap.parse_args(argv)
    if args.rebuild or args.ship or args.seed is not None:
        if args.names != ["tiny-pretrained"] or not args.rebuild:
            ap.error("--rebuild (with --seed, --ship) applies to tiny-pretrained alone")
        standins.rebuild(args.seed, args.cache_dir, ship=args.ship)
        return
    for name in args.names:
        t0 = time.perf_counter()
        model = load_backbone(name, cache_dir=args.cache_dir)
        print(f"{model} ready in {time.perf_counter() - t0:.1f} s, weights sha256 {model.fingerprint[:16]}")


if __name__ == "__main__":
    from biovlm.config import stage_main

    stage_main("python -m biovlm.backbone", main)  # an expected failure is one line; BIOVLM_DEBUG=1 shows more
