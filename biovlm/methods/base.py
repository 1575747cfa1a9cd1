"""The interface every method implements, and the prompt-building helper shared by the prompt learners.

Methods work on cached, L2-normalised image features: the image tower never runs here. Constant texts
(templates, attributes) and the constant token parts of learned prompts are computed once per class list and
cached by the tuple of names, so a training step only runs the text encoder on the learned prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

CHECKPOINT_VERSION = 2  # 2: the dataset's prompt wording (meta["info"]), enough to predict with on its own


class NotTransferable(ValueError):
    """Raised by a method that cannot produce logits for a class list it was not trained on (linear probe)."""


def merge_knobs(method: str, defaults: dict, given: dict | None) -> dict:
    """defaults overlaid with the given knobs; an unknown knob is an error that lists the valid ones."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"unknown knob(s) {unknown} for method {method!r}; valid knobs: {sorted(defaults)}")
    return {**defaults, **given}


def check_positive_int(method: str, knobs: dict, *names: str) -> None:
    for n in names:
        v = knobs[n]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{method}.{n} must be a positive integer, got {v!r}")


def check_non_negative(method: str, knobs: dict, *names: str) -> None:
    for n in names:
        v = knobs[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{method}.{n} must be a number >= 0, got {v!r}")


def check_ratio(method: str, knobs: dict, *names: str) -> None:
    for n in names:
        v = knobs[n]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"{method}.{n} must be in (0, 1], got {v!r}")


class Method(nn.Module):
    """A classifier over cached image features for any class list.

    Subclasses set ``name``, ``DEFAULTS`` (every knob with its default), ``trainable`` (trained by the SGD loop
    in ``biovlm.train``), ``needs_attributes`` (uses the attributes of the training classes) and ``class_specific``
    (its classifier exists only for the training classes: ``logits`` on others raises ``NotTransferable``), and
    implement ``text_head`` / ``head_logits`` (and ``loss`` when trainable).
    """

    name: ClassVar[str] = ""
    DEFAULTS: ClassVar[dict] = {}
    trainable: ClassVar[bool] = True
    needs_attributes: ClassVar[bool] = False
    class_specific: ClassVar[bool] = False  # True: cannot classify classes it was not trained on

    def __init__(self, backbone, knobs: dict | None, info, class_ids: Sequence[int],
                 attributes: Sequence[Sequence[str]] | None = None):
        super().__init__()
        self.__dict__["backbone"] = backbone  # never a submodule: the frozen tower is not part of a checkpoint
        self.knobs = merge_knobs(self.name, self.DEFAULTS, knobs)
        self.validate_knobs()
        self.info = info
        self.class_ids = [int(c) for c in class_ids]
        if not self.class_ids or len(set(self.class_ids)) != len(self.class_ids):
            raise ValueError(f"class_ids must be a non-empty list of distinct label ids, got {self.class_ids}")
        if max(self.class_ids) >= info.n_classes or min(self.class_ids) < 0:
            raise ValueError(f"class_ids {self.class_ids} out of range for {info.name} ({info.n_classes} classes)")
        self.class_names = [info.prompt_names[c] for c in self.class_ids]
        self.attributes = None
        if attributes is not None:
            if len(attributes) != info.n_classes:
                raise ValueError(f"attributes must hold one list per class of {info.name} ({info.n_classes}), "
                                 f"got {len(attributes)} lists")
            self.attributes = [list(attributes[c]) for c in self.class_ids]
        if self.needs_attributes and self.attributes is None:
            raise ValueError(f"method {self.name!r} with these knobs needs attributes by label id "
                             "(pass attributes=biovlm.filtering.load_table(path).select(shots, classes, keep))")
        self.scale = float(backbone.logit_scale)
        self._text_cache: dict[Any, Any] = {}

    # ---- knobs and parameters -------------------------------------------------------------------------------
    def validate_knobs(self) -> None:
        """Raise ValueError on a bad knob value (subclasses extend)."""

    def reset_parameters(self, generator: torch.Generator) -> None:
        """(Re-)initialise the learned tensors from ``generator``; called by ``train.fit`` for determinism."""

    def setup(self, features: torch.Tensor, labels: torch.Tensor,
              validation: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Called by ``train.fit`` before any step with the clean features [N, D] and labels [N] (0..C-1) of the
        training shots, and the run's validation shots (features, labels; None if it has none). Closed-form
        methods (linear probe) fit here; others may precompute from the shots."""

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # ---- constant texts (encoded once, cached) --------------------------------------------------------------
    def encode_constant(self, texts: Sequence[str]) -> torch.Tensor:
        """[N, D] normalised features of fixed texts, encoded once and cached by the tuple of texts."""
        key = ("texts", tuple(texts))
        if key not in self._text_cache:
            with torch.no_grad():
                feats = self.backbone.encode_texts(list(texts)).float()
            self._text_cache[key] = F.normalize(feats, dim=-1).to(self.device)
        return self._text_cache[key]

    def template_features(self, class_names: Sequence[str], info) -> torch.Tensor:
        """[C, D] features of the hand template (``"a <modality> of <class>."``)."""
        from biovlm import prompts

        return self.encode_constant([prompts.template_text(info, n) for n in class_names])

    def attribute_features(self, class_names: Sequence[str], info,
                           attributes: Sequence[Sequence[str]] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-attribute classifiers [J, C, D], per-class mean [C, D]) from the attributes of these classes.

        Classifier j uses attribute j of every class, so J is the shortest class list (longer lists are cut for
        the classifiers; the per-class mean uses every attribute of the class). All vectors are normalised.
        """
        from biovlm import prompts

        if attributes is None:
            raise ValueError(f"method {self.name!r} needs the attributes of the classes {list(class_names)}")
        if len(attributes) != len(class_names):
            raise ValueError(f"got {len(attributes)} attribute lists for {len(class_names)} classes")
        empty = [class_names[i] for i, attrs in enumerate(attributes) if len(attrs) == 0]
        if empty:
            raise ValueError(f"classes without any attribute: {empty}")
        texts = [prompts.attribute_text(info, class_names[i], a) for i, attrs in enumerate(attributes) for a in attrs]
        feats = self.encode_constant(texts)
        per_class, start = [], 0
        for attrs in attributes:
            per_class.append(feats[start:start + len(attrs)])
            start += len(attrs)
        j = min(len(a) for a in attributes)
        classifiers = torch.stack([f[:j] for f in per_class], dim=1)  # [J, C, D]
        mean = F.normalize(torch.stack([f.mean(dim=0) for f in per_class]), dim=-1)
        return classifiers, mean

    # ---- prediction -----------------------------------------------------------------------------------------
    def text_head(self, class_names: Sequence[str], info, attributes=None) -> Any:
        """Everything about the class list that does not depend on the image (text features, ...)."""
        raise NotImplementedError

    def head_logits(self, head: Any, image_features: torch.Tensor) -> torch.Tensor:
        """[B, D] image features -> [B, C] logits for the class list of ``head``."""
        raise NotImplementedError

    def logits(self, image_features: torch.Tensor, class_names: Sequence[str], info,
               attributes: Sequence[Sequence[str]] | None = None) -> torch.Tensor:
        """[B, D] -> [B, C] logits for any class list (prompt names of ``info``)."""
        return self.head_logits(self.text_head(list(class_names), info, attributes), image_features)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """(total loss, {term: value, ..., "acc": batch accuracy}) for one batch of the training classes."""
        raise NotImplementedError(f"method {self.name!r} is not trained by gradient descent")

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        """{"meta": json-able dict, "tensors": {name: CPU tensor}} — small, and enough to rebuild the method."""
        meta = {"method": self.name, "version": CHECKPOINT_VERSION, "knobs": dict(self.knobs),
                "backbone": getattr(self.backbone, "name", None), "dataset": self.info.name,
                "class_ids": list(self.class_ids), "class_names": list(self.class_names),
                "attributes": self.attributes, "info": self.info.to_meta()}
        meta.update(self.extra_meta())
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        return {"meta": meta, "tensors": tensors}

    def extra_meta(self) -> dict:
        return {}

    def load_extra_meta(self, meta: dict) -> None:
        """Restore what ``extra_meta`` recorded (called by ``from_checkpoint``)."""

    @classmethod
    def from_checkpoint(cls, source, backbone) -> Method:
        """The trained method ``source`` holds, rebuilt on ``backbone`` with its knobs, classes, attributes, prompt
        wording and tensors, in eval mode. ``source``: a method checkpoint (what ``checkpoint()`` returns), a run
        file of the train stage (``checkpoints/<dataset>/<method>/<setting>/<dataset>/k<K>_seed<S>.pt``) or its
        loaded dict. Called on a subclass, the checkpoint must be of that method. See ``biovlm.checkpoints``."""
        from biovlm.checkpoints import load_method

        return load_method(source, backbone, None if cls is Method else cls)

    def load_checkpoint(self, state: dict) -> None:
        meta = state.get("meta", {})
        if meta.get("method") != self.name:
            raise ValueError(f"checkpoint is for method {meta.get('method')!r}, not {self.name!r}")
        backbone = getattr(self.backbone, "name", None)
        if meta.get("backbone") not in (None, backbone):
            raise ValueError(f"checkpoint was trained with backbone {meta.get('backbone')!r}, "
                             f"but this method uses {backbone!r}")
        try:
            self.load_state_dict({k: v.to(self.device) for k, v in state["tensors"].items()})
        except RuntimeError as e:
            raise ValueError(f"checkpoint tensors do not fit this {self.name} (built with knobs {self.knobs}; "
                             f"checkpoint knobs {meta.get('knobs')}): {e}") from None


def cosine_logits(scale: float, image_features: torch.Tensor, text: torch.Tensor,
                  pattern: str = "bd,cd->bc") -> torch.Tensor:
    """scale * f . t in float32 even under bf16 autocast (bf16 logits of size ~30 would be quantised to ~0.1)."""
    with torch.autocast(image_features.device.type, enabled=False):
        return scale * torch.einsum(pattern, image_features.float(), text.float())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=-1) == labels).float().mean().item()


# ---- learned prompts ------------------------------------------------------------------------------------------
class PromptTokens:
    """Constant parts of the prompts ``"X X X X <name>."`` for a class list, cached by the tuple of names.

    ``embed(names)`` gives word embeddings [C, L, W] (positions 1..n_ctx hold the placeholder and are overwritten
    by the learned context) and the attention mask [C, L]; ``encode(ctx, names)`` builds the G x C prompts for
    G contexts [G, n_ctx, W] and encodes them in one batched call -> [G, C, D] normalised features.
    """

    def __init__(self, backbone, n_ctx: int):
        self.backbone = backbone
        self.n_ctx = n_ctx
        self._cache: dict[tuple[str, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def embed(self, class_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        from biovlm.prompts import PLACEHOLDER, context_prompt

        key = tuple(class_names)
        if key not in self._cache:
            ids, mask = self.backbone.tokenize([context_prompt(n, self.n_ctx) for n in key])
            ph_ids, _ = self.backbone.tokenize([PLACEHOLDER])
            ctx_ids = ids[:, 1:1 + self.n_ctx]
            if ids.shape[1] < 2 + self.n_ctx or not bool((ctx_ids == ph_ids[0, 1]).all()):
                raise RuntimeError(f"the tokenizer of {getattr(self.backbone, 'name', '?')} does not map each "
                                   f"{PLACEHOLDER!r} of the prompt prefix to one token at positions 1..{self.n_ctx}")
            ids, mask = ids.to(self.backbone.device), mask.to(self.backbone.device)
            with torch.no_grad():
                emb = self.backbone.token_embeddings(ids).float()
            self._cache[key] = (emb, mask)
        return self._cache[key]

    def encode(self, ctx: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        emb, mask = self.embed(class_names)
        g, c = ctx.shape[0], emb.shape[0]
        length, width = emb.shape[1], emb.shape[2]
        x = torch.cat([emb[None, :, :1].expand(g, c, 1, width),
                       ctx[:, None].to(emb.dtype).expand(g, c, self.n_ctx, width),
                       emb[None, :, 1 + self.n_ctx:].expand(g, c, length - 1 - self.n_ctx, width)], dim=2)
        feats = self.backbone.encode_text_embeddings(x.reshape(g * c, length, width), mask.repeat(g, 1))
        return F.normalize(feats.float(), dim=-1).view(g, c, -1)


def context_init(backbone, n_ctx: int, phrase: str | None, n_contexts: int,
                 generator: torch.Generator) -> torch.Tensor:
    """[G, n_ctx, W] initial contexts: N(0, 0.02), or the word embeddings of ``phrase`` (which must tokenize to
    exactly n_ctx tokens). With a phrase and G > 1, context 0 is the phrase and the others add N(0, 0.02) noise,
    so that a bank does not start as G identical members (they would receive identical gradients forever)."""
    width = backbone.text_width
    noise = torch.randn(n_contexts, n_ctx, width, generator=generator) * 0.02
    if not phrase:
        return noise
    ids, mask = backbone.tokenize([phrase])
    n_tokens = int(mask[0].sum()) - 2  # minus the start and end tokens
    if n_tokens != n_ctx:
        raise ValueError(f"ctx_init {phrase!r} has {n_tokens} tokens but n_ctx is {n_ctx}: set n_ctx to "
                         f"{n_tokens} or change the phrase")
    with torch.no_grad():
        words = backbone.token_embeddings(ids.to(backbone.device))[0, 1:1 + n_ctx].float().cpu()
    noise[0] = 0
    return words[None] + noise


class PromptMethod(Method):
    """Base of the learned-context methods: G contexts of n_ctx tokens, class-agnostic (any class list)."""

    n_contexts: int = 1

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        check_positive_int(self.name, self.knobs, "n_ctx")
        self.tokens = PromptTokens(backbone, self.knobs["n_ctx"])
        g = torch.Generator().manual_seed(0)
        self.ctx = nn.Parameter(self._init_ctx(g).to(self.device))

    def _init_ctx(self, generator: torch.Generator) -> torch.Tensor:
        return context_init(self.backbone, self.knobs["n_ctx"], self.knobs.get("ctx_init") or None,
                            self.n_contexts, generator)

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            self.ctx.copy_(self._init_ctx(generator).to(self.ctx.device))

    def prompt_features(self, class_names: Sequence[str]) -> torch.Tensor:
        """[G, C, D] features of the learned prompts for these classes (differentiable w.r.t. the context)."""
        return self.tokens.encode(self.ctx, class_names)

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        return self.prompt_features(class_names)

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.scale, image_features, head[0])
