"""Confidence filtering: the score, the selection of J per class, and the JSON record."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from biovlm import filtering as F
from biovlm.attributes import curated
from biovlm.data import get_dataset


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def clustered(C=3, N=4, D=16, per_class=5, seed=0):
    """Images of class c near the basis vector e_c; every attribute text a random-ish direction, except that
    class 0's attribute 2 points exactly at e_0 and class 1's attribute 0 describes class 2 instead (points at e_2)."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(D)
    labels = torch.arange(C).repeat_interleave(per_class)
    images = unit(eye[labels] + 0.1 * torch.randn(len(labels), D, generator=g))
    text = unit(0.3 * eye[:C, None, :] + torch.randn(C, N, D, generator=g))
    text[0, 2] = eye[0]
    text[1, 0] = eye[2]
    return text, images, labels


def test_matching_attribute_scores_highest_and_is_kept():
    text, images, labels = clustered()
    scores = F.score_attributes(text, images, labels, logit_scale=20.0)
    assert scores.shape == (3, 4)
    assert ((scores > 0) & (scores < 1)).all()
    assert scores[0].argmax().item() == 2 and scores[0, 2] > 0.9
    assert scores[1].argmin().item() == 0  # a description of another class
    names = ["c0", "c1", "c2"]
    attrs = [[f"attr {c}.{i}" for i in range(4)] for c in range(3)]
    rec = F.filter_scored("toy", names, attrs, scores, keep=1)
    assert rec["kept"][0] == ["attr 0.2"]
    assert "attr 1.0" not in rec["kept"][1]


def test_keeps_j_per_class_and_lists_every_attribute(tmp_path):
    text, images, labels = clustered(C=4, N=6)
    attrs = [[f"a{c}-{i}" for i in range(6)] for c in range(4)]
    scores = F.score_attributes(text, images, labels, 30.0)
    rec = F.filter_scored("toy", ["w", "x", "y", "z"], attrs, scores, keep=3)
    assert rec["keep"] == 3 and rec["score"] == F.SCORE_NAME
    assert [len(k) for k in rec["kept"]] == [3, 3, 3, 3]
    assert [(r["class"], r["attribute"]) for r in rec["scores"]] == [(c, a) for c in range(4) for a in attrs[c]]
    for c in range(4):
        rows = [r for r in rec["scores"] if r["class"] == c]
        assert sorted(r["attribute"] for r in rows if r["kept"]) == sorted(rec["kept"][c])
        assert sorted(r["rank"] for r in rows) == list(range(1, 7))
        best = sorted(rows, key=lambda r: r["rank"])
        assert [r["attribute"] for r in best[:3]] == rec["kept"][c]  # kept best first
        assert min(r["score"] for r in rows if r["kept"]) >= max(r["score"] for r in rows if not r["kept"])
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(rec))
    assert F.load_filtered(path) == rec["kept"]


def test_selection_is_deterministic_with_ties_by_index():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.9, 0.2]])
    assert F.select(scores, 2) == [[0, 1], [1, 2]]
    text, images, labels = clustered()
    assert torch.equal(F.score_attributes(text, images, labels, 20.0), F.score_attributes(text, images, labels, 20.0))
    with pytest.raises(ValueError, match=r"filter.keep must be in 1..4"):
        F.select(scores, 5)


def test_clear_errors():
    text, images, labels = clustered()
    with pytest.raises(ValueError, match=r"classes without shots: \[2\]"):
        F.score_attributes(text, images[labels < 2], labels[labels < 2], 20.0)
    with pytest.raises(FileNotFoundError, match="run the 'filter' stage"):
        F.load_filtered("/nonexistent/x.json")


def test_filter_with_tiny_backbone(tiny_backbone):
    info = get_dataset("breastmnist")
    attrs = curated("breastmnist")
    g = torch.Generator().manual_seed(0)
    feats = SimpleNamespace(pool_clean=unit(torch.randn(8, tiny_backbone.embed_dim, generator=g)),
                            pool_labels=torch.tensor([0, 1] * 4))
    rec = F.filter_attributes(info, attrs, tiny_backbone, feats, keep=4)
    assert rec["dataset"] == "breastmnist" and [len(k) for k in rec["kept"]] == [4, 4]
    assert len(rec["scores"]) == 20 and all(0 < r["score"] < 1 for r in rec["scores"])
    assert all(set(k) <= set(a) for k, a in zip(rec["kept"], attrs, strict=True))
    assert F.filter_attributes(info, attrs, tiny_backbone, feats, keep=4) == rec
