"""Confidence filtering of class attributes with the frozen backbone.

Score ``SCORE_NAME`` ("mean_softmax_vs_other_classes"): for class c and its attribute a, the text
t = ``prompts.attribute_text(info, class_c, a)`` competes with one text per other class j, the (re-normalised) mean
embedding m_j of all of class j's attribute texts. On every class-c shot image x,

    p(x) = softmax(s * [x.t, x.m_j for j != c])[0] = sigmoid(s * x.t - logsumexp_j(s * x.m_j))

with s the backbone's logit scale; the score is the mean of p over the class-c shots. It reads as "how often, and
how confidently, would this one description pick the right class against the average description of every other
class". Unlike a raw similarity it rewards attributes that *separate* class c (a generic "a round shape" that matches
every class equally scores low) and, being a bounded probability, it is comparable across classes and datasets.
Each class keeps its J best attributes (the same J for every class); ties break by original index, so the choice is
deterministic for given features.

The images are the clean (resize-only) features of the few-shot pool, ``FeatureSet.pool_clean``: training images
only, the union over seeds of the largest shot sets. The filter runs once per dataset and its choice is shared by
every seed and K.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from biovlm.backbone import Backbone
    from biovlm.data import DatasetInfo
    from biovlm.features import FeatureSet

SCORE_NAME = "mean_softmax_vs_other_classes"


def score_attributes(text_features: torch.Tensor, image_features: torch.Tensor, labels: torch.Tensor,
                     logit_scale: float) -> torch.Tensor:
    """Scores [C,N] from L2-normalised attribute text features [C,N,D] and image features [P,D] with labels [P]."""
    import torch

    C, N, _ = text_features.shape
    if C < 2:
        raise ValueError(f"attribute scoring needs at least 2 classes, got {C}")
    labels = torch.as_tensor(labels).long()
    counts = torch.bincount(labels, minlength=C)
    if (counts[:C] == 0).any() or labels.max() >= C:
        missing = [c for c in range(C) if counts[c] == 0]
        raise ValueError(f"every class needs shot features to score its attributes; classes without shots: "
                         f"{missing}, label range 0..{int(labels.max())} for {C} classes")
    text = text_features.float()
    means = torch.nn.functional.normalize(text.mean(dim=1), dim=-1)  # [C,D]
    x = image_features.float()
    scores = torch.empty(C, N)
    for c in range(C):
        xc = x[labels == c]  # [Pc,D]
        other = logit_scale * (xc @ means.T)  # [Pc,C]
        other[:, c] = float("-inf")
        rest = torch.logsumexp(other, dim=1, keepdim=True)  # [Pc,1]
        own = logit_scale * (xc @ text[c].T)  # [Pc,N]
        scores[c] = torch.sigmoid(own - rest).mean(dim=0)
    return scores


def select(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """Indices of the ``keep`` best attributes per class, best first; ties broken by the lower index."""
    C, N = scores.shape
    if not 1 <= keep <= N:
        raise ValueError(f"filter.keep must be in 1..{N} (attributes per class), got {keep}")
    rows = scores.tolist()
    return [sorted(range(N), key=lambda i, r=row: (-r[i], i))[:keep] for row in rows]


def filter_scored(dataset: str, class_names: list[str], attributes: list[list[str]], scores: torch.Tensor,
                  keep: int) -> dict:
    """The JSON record of the ``filter`` stage from precomputed scores."""
    chosen = select(scores, keep)
    order = select(scores, scores.shape[1])  # the full ranking, best first
    rows = []
    for c, (name, attrs) in enumerate(zip(class_names, attributes, strict=True)):
        kept = set(chosen[c])
        rank = {i: k + 1 for k, i in enumerate(order[c])}
        rows += [{"class": c, "class_name": name, "attribute": a, "score": round(float(scores[c, i]), 6),
                  "rank": rank[i], "kept": i in kept} for i, a in enumerate(attrs)]
    return {"dataset": dataset, "keep": keep, "score": SCORE_NAME,
            "kept": [[attributes[c][i] for i in idx] for c, idx in enumerate(chosen)], "scores": rows}


def encode_attributes(info: DatasetInfo, attributes: list[list[str]], backbone: Backbone) -> torch.Tensor:
    """Attribute text features [C,N,D], all texts encoded in one call."""
    from biovlm.prompts import attribute_text

    if len(attributes) != info.n_classes:
        raise ValueError(f"{info.name}: {len(attributes)} attribute lists for {info.n_classes} classes")
    n = len(attributes[0])
    if any(len(a) != n for a in attributes):
        raise ValueError(f"{info.name}: every class needs the same number of attributes, got "
                         f"{[len(a) for a in attributes]}")
    texts = [attribute_text(info, name, a) for name, attrs in zip(info.prompt_names, attributes, strict=True)
             for a in attrs]
    return backbone.encode_texts(texts).reshape(info.n_classes, n, -1)


def filter_attributes(info: DatasetInfo, attributes: list[list[str]], backbone: Backbone, features: FeatureSet,
                      keep: int) -> dict:
    """Score every attribute on the few-shot pool (``features.pool_clean``) and keep the ``keep`` best per class."""
    text = encode_attributes(info, attributes, backbone).cpu()
    scores = score_attributes(text, features.pool_clean.cpu(), features.pool_labels.cpu(), backbone.logit_scale)
    return filter_scored(info.name, list(info.prompt_names), attributes, scores, keep)


def load_filtered(path: str | Path) -> list[list[str]]:
    """The kept attributes of a ``filter`` stage output, indexed by label id."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"filtered attribute file {path} not found; run the 'filter' stage")
    kept = json.loads(path.read_text("utf-8")).get("kept")
    if not isinstance(kept, list) or not kept or any(not isinstance(k, list) or len(k) != len(kept[0]) for k in kept):
        raise ValueError(f"{path}: 'kept' must hold the same number of attributes for every class")
    return kept
