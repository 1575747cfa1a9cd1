"""Confidence filtering of class attributes: a table computed once per dataset, a selection made per run.

The ``filter`` stage computes the expensive part once: the **confidence table** of a dataset, the cosine of every
few-shot pool image (the union over seeds of the largest shot sets, clean features) with every attribute text
``prompts.attribute_text(info, class, a)`` and with every class's mean attribute text (re-normalised). It is written
as JSON, so every number can be inspected.

Each run then selects its own attributes (``ConfidenceTable.select``), from **its own training shots of its own
training classes only**: never another seed's shots, validation or test images, novel classes' images or names.
Score ``SCORE_NAME``: for a training class c and its attribute a, the text t competes with the mean attribute text
m_j of every *other training class* j. On each of the run's class-c shots x,

    p(x) = softmax(s * [x.t, x.m_j for j != c])[0] = sigmoid(s * x.t - logsumexp_j(s * x.m_j))

with s the backbone's logit scale; the score is the mean of p over those shots. It reads as "how often, and how
confidently, would this one description pick the right class against the average description of every other
class": a generic "a round shape" that matches every class equally scores low, and, being a bounded probability, it
is comparable across classes. Each training class keeps its J best attributes (``filter.keep``; ties break by
original index) and lists them in their original order: teacher classifier j pairs the j-th kept attribute of
every class, so with ``keep`` = all (the paper profile, as the public code uses all 10) the teacher is the
public code's. Classes the run has no shots of (base-to-novel's novel classes, another dataset's classes) keep
every attribute: a label-free choice. Source: the BioVLM paper's confidence filtering, restricted to what a run may
see (the public code ranks on the training set of its own run too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from biovlm.backbone import Backbone
    from biovlm.data import DatasetInfo
    from biovlm.features import FeatureSet

SCORE_NAME = "mean_softmax_vs_other_training_classes"
TABLE_FORMAT = 3  # 3: the attribute template recorded


@dataclass
class ConfidenceTable:
    """Every pool image's cosine with every attribute text and every class's mean attribute text."""

    dataset: str
    class_names: list[str]
    attributes: list[list[str]]  # every attribute, by label id (N per class)
    pool_indices: np.ndarray  # [P] train-split index of each row (the feature file's pool, same order)
    pool_labels: np.ndarray  # [P]
    similarity: torch.Tensor  # [P, C, N]
    class_similarity: torch.Tensor  # [P, C]
    logit_scale: float
    attribute_template: str = "project"  # how the attribute texts were worded (data.attribute_template)

    def scores(self, rows: np.ndarray, class_ids: list[int]) -> torch.Tensor:
        """Scores [len(class_ids), N] of the training classes' attributes on the table rows ``rows`` (a run's
        shots), each class ranked against the other training classes only."""
        rows = np.asarray(rows, dtype=np.int64)
        labels = self.pool_labels[rows]
        s = self.logit_scale
        out = torch.empty(len(class_ids), self.similarity.shape[2])
        for i, c in enumerate(class_ids):
            own_rows = rows[labels == c]
            if len(own_rows) == 0:
                raise ValueError(f"{self.dataset}: the run has no shots of class {c} to score its attributes")
            others = [j for j in class_ids if j != c]
            own = s * self.similarity[own_rows, c, :]  # [Pc, N]
            if others:
                rest = torch.logsumexp(s * self.class_similarity[own_rows][:, others], dim=1, keepdim=True)
                out[i] = torch.sigmoid(own - rest).mean(dim=0)
            else:  # a single training class has no competitor: every attribute is equally sure
                out[i] = 1.0
        return out

    def select(self, rows: np.ndarray, class_ids: list[int], keep: int) -> list[list[str]]:
        """Attributes by label id for one run: the ``keep`` best of each training class (in their original order)
        from the run's shots ``rows``; every attribute for the classes the run has no shots of."""
        chosen = select(self.scores(rows, class_ids), keep)
        out = [list(a) for a in self.attributes]
        for c, idx in zip(class_ids, chosen, strict=True):
            out[c] = [self.attributes[c][i] for i in idx]
        return out


def select(scores: torch.Tensor, keep: int) -> list[list[int]]:
    """Indices of the ``keep`` best attributes per class (ties broken by the lower index), in ascending order."""
    C, N = scores.shape
    if not 1 <= keep <= N:
        raise ValueError(f"filter.keep must be in 1..{N} (attributes per class), got {keep}")
    rows = scores.tolist()
    return [sorted(sorted(range(N), key=lambda i, r=row: (-r[i], i))[:keep]) for row in rows]


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


def build_table(info: DatasetInfo, attributes: list[list[str]], backbone: Backbone,
                features: FeatureSet) -> ConfidenceTable:
    """The confidence table of one dataset from its pool's clean features."""
    text = encode_attributes(info, attributes, backbone).cpu().float()  # [C, N, D]
    means = torch.nn.functional.normalize(text.mean(dim=1), dim=-1)  # [C, D]
    x = features.pool_clean.cpu().float()  # [P, D]
    return ConfidenceTable(info.name, list(info.prompt_names), [list(a) for a in attributes],
                           np.asarray(features.pool_indices), np.asarray(features.pool_labels),
                           torch.einsum("pd,cnd->pcn", x, text), x @ means.T, float(backbone.logit_scale),
                           info.attribute_template)


def save_table(table: ConfidenceTable, path: str | Path) -> None:
    """Write the table as JSON, one entry per pool image (its split index, label and cosines)."""
    record = {"format": TABLE_FORMAT, "dataset": table.dataset, "score": SCORE_NAME, "classes": table.class_names,
              "attribute_template": table.attribute_template, "attributes": table.attributes,
              "logit_scale": table.logit_scale,
              "images": [{"index": int(i), "label": int(y), "attribute_cosine": sim.tolist(),
                          "class_mean_cosine": csim.tolist()}
                         for i, y, sim, csim in zip(table.pool_indices, table.pool_labels, table.similarity,
                                                    table.class_similarity, strict=True)]}
    Path(path).write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")


def load_table(path: str | Path) -> ConfidenceTable:
    """Read a table written by ``save_table``; a missing or older file names the stage to rerun."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"confidence table {path} not found; run the 'filter' stage")
    record = json.loads(path.read_text("utf-8"))
    if record.get("format") != TABLE_FORMAT:
        raise ValueError(f"{path} is confidence-table format {record.get('format')}, this code reads "
                         f"{TABLE_FORMAT}; rerun the 'filter' stage")
    images = record["images"]
    return ConfidenceTable(record["dataset"], record["classes"], record["attributes"],
                           np.array([im["index"] for im in images], dtype=np.int64),
                           np.array([im["label"] for im in images], dtype=np.int64),
                           torch.tensor([im["attribute_cosine"] for im in images], dtype=torch.float32),
                           torch.tensor([im["class_mean_cosine"] for im in images], dtype=torch.float32),
                           float(record["logit_scale"]), record["attribute_template"])
