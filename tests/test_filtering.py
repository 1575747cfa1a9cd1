"""Confidence filtering: the table (computed once per dataset) and the per-run selection, which must read only the
run's own shots of its own training classes."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from biovlm import filtering as F
from biovlm.attributes import curated
from biovlm.data import get_dataset


def unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def table_from_vectors(text: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, scale: float):
    C, N, _ = text.shape
    attrs = [[f"attr {c}.{i}" for i in range(N)] for c in range(C)]
    means = unit(text.mean(dim=1))
    return F.ConfidenceTable("toy", [f"c{c}" for c in range(C)], attrs, np.arange(len(labels)), labels.numpy(),
                             torch.einsum("pd,cnd->pcn", images, text), images @ means.T, scale)


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


def plain_scores(text, images, labels, rows, class_ids, scale):
    """The score written out image by image: p(x) = softmax over [x.t, x.m_j for the other training classes]."""
    means = unit(text.mean(dim=1))
    out = []
    for c in class_ids:
        per_attr = []
        for a in range(text.shape[1]):
            ps = []
            for r in rows:
                if int(labels[r]) != c:
                    continue
                x = images[r]
                logits = [scale * float(x @ text[c, a])] + [scale * float(x @ means[j]) for j in class_ids if j != c]
                top = max(logits)
                ps.append(math.exp(logits[0] - top) / sum(math.exp(v - top) for v in logits))
            per_attr.append(sum(ps) / len(ps))
        out.append(per_attr)
    return torch.tensor(out)


def test_matching_attribute_scores_highest_and_is_kept():
    text, images, labels = clustered()
    table = table_from_vectors(text, images, labels, 20.0)
    rows = np.arange(len(labels))
    scores = table.scores(rows, [0, 1, 2])
    assert scores.shape == (3, 4) and ((scores > 0) & (scores < 1)).all()
    assert scores[0].argmax().item() == 2 and scores[0, 2] > 0.9
    assert scores[1].argmin().item() == 0  # a description of another class
    kept = table.select(rows, [0, 1, 2], keep=1)
    assert kept[0] == ["attr 0.2"] and "attr 1.0" not in kept[1]


def test_run_selection_equals_a_plain_computation_on_its_own_shots_only():
    text, images, labels = clustered(C=4, N=6, per_class=6, seed=3)
    table = table_from_vectors(text, images, labels, 25.0)
    rows = np.array([0, 2, 6, 7, 13, 19, 20])  # one run's shots: 2 of class 0, 2 of 1, 1 of 2, 2 of 3
    expected = plain_scores(text, images, labels, rows, [0, 1, 2, 3], 25.0)
    torch.testing.assert_close(table.scores(rows, [0, 1, 2, 3]), expected, rtol=1e-5, atol=1e-6)
    kept = table.select(rows, [0, 1, 2, 3], keep=3)
    for c in range(4):
        order = sorted(sorted(range(6), key=lambda i, c=c: (-float(expected[c, i]), i))[:3])  # the file's order
        assert kept[c] == [f"attr {c}.{i}" for i in order]
    # every row outside the run's shots replaced by garbage: the same selection
    garbage = copy.deepcopy(table)
    others = np.setdiff1d(np.arange(len(labels)), rows)
    garbage.similarity[others] = torch.rand(len(others), 4, 6)
    garbage.class_similarity[others] = torch.rand(len(others), 4)
    assert garbage.select(rows, [0, 1, 2, 3], keep=3) == kept


def test_base_classes_are_ranked_without_novel_images_or_novel_texts():
    text, images, labels = clustered(C=4, N=5, per_class=4, seed=1)
    table = table_from_vectors(text, images, labels, 30.0)
    base, novel = [0, 1], [2, 3]
    rows = np.flatnonzero(np.isin(labels.numpy(), base))
    kept = table.select(rows, base, keep=2)
    expected = plain_scores(text, images, labels, rows, base, 30.0)
    assert kept[:2] == [[f"attr {c}.{i}" for i in F.select(expected, 2)[c]] for c in range(2)]
    assert kept[2:] == [table.attributes[c] for c in novel]  # no shots of them: every attribute, label-free
    garbage = copy.deepcopy(table)
    novel_rows = np.flatnonzero(np.isin(labels.numpy(), novel))
    garbage.similarity[novel_rows] = torch.rand(len(novel_rows), 4, 5)
    garbage.similarity[:, novel] = torch.rand(len(labels), 2, 5)
    garbage.class_similarity[:, novel] = torch.rand(len(labels), 2)
    assert garbage.select(rows, base, keep=2) == kept


def test_single_training_class_and_missing_shots():
    text, images, labels = clustered()
    table = table_from_vectors(text, images, labels, 20.0)
    assert table.select(np.array([0, 1]), [0], keep=2)[0] == ["attr 0.0", "attr 0.1"]  # no competitor: by index
    assert table.scores(np.array([0, 1]), [0]).tolist() == [[1.0] * 4]  # every attribute sure: p = 1
    with pytest.raises(ValueError, match=r"toy: the run has no shots of class 2"):
        table.select(np.array([0, 5]), [0, 1, 2], keep=1)


def test_selection_is_deterministic_with_ties_by_index():
    scores = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.9, 0.2]])
    assert F.select(scores, 2) == [[0, 1], [1, 2]]
    assert F.select(scores, 3) == [[0, 1, 2], [1, 2, 3]]  # the 3 best of row 1 (1, 2, 3), in the file's order
    # keep every attribute (J = N, the paper profile): the file's order, so teacher classifier j is attribute j
    # of every class, as in the public code
    assert F.select(scores, 4) == [[0, 1, 2, 3], [0, 1, 2, 3]]
    with pytest.raises(ValueError, match=r"filter.keep must be in 1..4"):
        F.select(scores, 5)


def test_table_round_trips_through_json_exactly(tiny_backbone, tmp_path):
    info = get_dataset("breastmnist")
    attrs = curated("breastmnist")
    g = torch.Generator().manual_seed(0)
    feats = SimpleNamespace(pool_clean=unit(torch.randn(8, tiny_backbone.embed_dim, generator=g)),
                            pool_labels=torch.tensor([0, 1] * 4), pool_indices=np.arange(10, 18))
    table = F.build_table(info, attrs, tiny_backbone, feats)
    assert table.similarity.shape == (8, 2, len(attrs[0])) and table.class_similarity.shape == (8, 2)
    text = F.encode_attributes(info, attrs, tiny_backbone).cpu()
    torch.testing.assert_close(table.similarity[3, 1], text[1] @ feats.pool_clean[3])
    mean_text = text.mean(dim=1) / text.mean(dim=1).norm(dim=-1, keepdim=True)
    torch.testing.assert_close(table.class_similarity[5], mean_text @ feats.pool_clean[5])
    assert table.dataset == "breastmnist" and table.class_names == list(info.prompt_names)
    F.save_table(table, tmp_path / "breastmnist.json")
    loaded = F.load_table(tmp_path / "breastmnist.json")
    assert torch.equal(loaded.similarity, table.similarity) and torch.equal(loaded.class_similarity,
                                                                             table.class_similarity)
    assert loaded.attributes == attrs and list(loaded.pool_indices) == list(range(10, 18))
    rows = np.arange(8)
    assert loaded.select(rows, [0, 1], 4) == table.select(rows, [0, 1], 4)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the 'filter' stage"):
        F.load_table("/nonexistent/x.json")
    (tmp_path / "old.json").write_text('{"kept": [["a"]]}')
    with pytest.raises(ValueError, match=r"old.json is confidence-table format None, this code reads 3; rerun"):
        F.load_table(tmp_path / "old.json")


def loop_scores(table: F.ConfidenceTable, rows, class_ids) -> list[list[float]]:
    """The score formula image by image, read straight off the table: for class c and attribute j, the mean over
    c's shots i of sigmoid(s * sim[i, c, j] - logsumexp_{k != c} s * class_sim[i, k])."""
    s = table.logit_scale
    out = []
    for c in class_ids:
        shots = [i for i in rows if int(table.pool_labels[i]) == c]
        per_attr = []
        for j in range(table.similarity.shape[2]):
            ps = []
            for i in shots:
                rest = [s * float(table.class_similarity[i, k]) for k in class_ids if k != c]
                top = max(rest)
                lse = top + math.log(sum(math.exp(v - top) for v in rest))
                ps.append(1 / (1 + math.exp(-(s * float(table.similarity[i, c, j]) - lse))))
            per_attr.append(sum(ps) / len(ps))
        out.append(per_attr)
    return out


def random_table(P=14, C=4, N=3, scale=7.0, seed=0) -> F.ConfidenceTable:
    g = torch.Generator().manual_seed(seed)
    labels = np.arange(P) % C
    return F.ConfidenceTable("rand", [f"c{c}" for c in range(C)], [[f"a{c}{j}" for j in range(N)] for c in range(C)],
                             np.arange(P), labels, torch.rand(P, C, N, generator=g) * 2 - 1,
                             torch.rand(P, C, generator=g) * 2 - 1, scale)


def test_score_equals_a_plain_loop_of_its_formula():
    table = random_table()
    rows = [0, 3, 4, 5, 8, 10, 11, 13]  # class 0: 0, 4, 8; class 1: 5, 13; class 2: 10; class 3: 3, 11
    for class_ids in ([0, 1, 2, 3], [3, 0, 2], [1, 3]):
        expected = torch.tensor(loop_scores(table, rows, class_ids))
        torch.testing.assert_close(table.scores(np.array(rows), class_ids), expected, rtol=1e-5, atol=1e-6)


def test_select_keeps_the_best_of_each_training_class_and_every_attribute_of_the_rest():
    table = random_table(N=4, seed=2)
    rows = np.arange(14)
    expected = loop_scores(table, rows, [2, 0])
    kept = table.select(rows, [2, 0], keep=2)
    for c, scores in zip([2, 0], expected, strict=True):
        best = sorted(sorted(range(4), key=lambda j, s=scores: (-s[j], j))[:2])
        assert kept[c] == [f"a{c}{j}" for j in best]
    assert kept[1] == table.attributes[1] and kept[3] == table.attributes[3]
    assert kept is not table.attributes and kept[1] is not table.attributes[1]


@pytest.mark.parametrize("keep", [0, 5])
def test_keep_outside_the_attribute_count_is_named(keep):
    with pytest.raises(ValueError, match=rf"^filter.keep must be in 1..4 \(attributes per class\), got {keep}$"):
        F.select(torch.zeros(2, 4), keep)
    assert F.select(torch.zeros(2, 4), 1) == [[0], [0]]


def test_encode_attributes_checks_the_lists(tiny_backbone):
    info = get_dataset("breastmnist")
    with pytest.raises(ValueError, match=r"^breastmnist: 1 attribute lists for 2 classes$"):
        F.encode_attributes(info, [["a"]], tiny_backbone)
    with pytest.raises(ValueError, match=r"^breastmnist: every class needs the same number of attributes, got "
                                         r"\[1, 2\]$"):
        F.encode_attributes(info, [["a"], ["b", "c"]], tiny_backbone)
    from biovlm.prompts import attribute_text

    got = F.encode_attributes(info, [["a", "b"], ["c", "d"]], tiny_backbone)
    texts = [attribute_text(info, info.prompt_names[c], a) for c, attrs in enumerate([["a", "b"], ["c", "d"]])
             for a in attrs]
    torch.testing.assert_close(got, tiny_backbone.encode_texts(texts).reshape(2, 2, -1))


def test_saved_table_is_readable_json(tmp_path):
    table = F.ConfidenceTable("toy", ["c0", "c1"], [["é"], ["b"]], np.array([5, 9]), np.array([1, 0]),
                              torch.tensor([[[0.5], [0.25]], [[1.0], [-1.0]]]), torch.tensor([[0.5, 0.0], [1.0, 2.0]]),
                              3.0, "reference")
    F.save_table(table, tmp_path / "t.json")
    text = (tmp_path / "t.json").read_text("utf-8")
    assert text.endswith("}\n") and "é" in text
    assert json.loads(text) == {
        "format": 3, "dataset": "toy", "score": "mean_softmax_vs_other_training_classes", "classes": ["c0", "c1"],
        "attribute_template": "reference", "attributes": [["é"], ["b"]], "logit_scale": 3.0,
        "images": [{"index": 5, "label": 1, "attribute_cosine": [[0.5], [0.25]], "class_mean_cosine": [0.5, 0.0]},
                   {"index": 9, "label": 0, "attribute_cosine": [[1.0], [-1.0]], "class_mean_cosine": [1.0, 2.0]}]}
    loaded = F.load_table(tmp_path / "t.json")
    assert loaded.pool_indices.dtype == np.int64 and loaded.pool_labels.tolist() == [1, 0]
    assert loaded.similarity.dtype == torch.float32 and loaded.logit_scale == 3.0 and loaded.dataset == "toy"
    assert loaded.class_names == ["c0", "c1"] and loaded.attribute_template == "reference"


def test_missing_table_message(tmp_path):
    path = tmp_path / "none.json"
    with pytest.raises(FileNotFoundError, match=f"^confidence table {re.escape(str(path))} not found; run the "
                                                "'filter' stage$"):
        F.load_table(path)
    path.write_text(json.dumps({"format": 1}))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is confidence-table format 1, this code reads 3; "
                                         "rerun the 'filter' stage$"):
        F.load_table(path)


def test_tables_are_utf8_whatever_the_locale(tmp_path):
    """Attribute texts are not ASCII-only: a table written and read under a plain C (ASCII) locale is still UTF-8."""
    import os
    import subprocess
    import sys

    script = ("import sys, numpy as np, torch; from biovlm import filtering as F; "
              "t = F.ConfidenceTable('toy', ['c'], [['\\u00e9paisse']], np.array([0]), np.array([0]), "
              "torch.zeros(1, 1, 1), torch.zeros(1, 1), 1.0); F.save_table(t, sys.argv[1]); "
              "assert F.load_table(sys.argv[1]).attributes == [['\\u00e9paisse']]")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.json")], env=env, capture_output=True,
                          text=True, cwd=Path(F.__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "\"épaisse\"" in (tmp_path / "t.json").read_text("utf-8")
    assert F.load_table(tmp_path / "t.json").attributes == [["épaisse"]]  # and here, whatever this locale is


def test_loaded_tables_have_fixed_dtypes(tmp_path):
    """Indices int64 and cosines float32 whatever torch's default dtype, even for a table without images."""
    empty = F.ConfidenceTable("toy", ["c"], [["a"]], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64),
                              torch.zeros(0, 1, 1), torch.zeros(0, 1), 1.0)
    F.save_table(empty, tmp_path / "empty.json")
    F.save_table(random_table(P=2, C=2, N=1), tmp_path / "two.json")
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        loaded = [F.load_table(tmp_path / "empty.json"), F.load_table(tmp_path / "two.json")]
    finally:
        torch.set_default_dtype(default)
    for table in loaded:
        assert table.pool_indices.dtype == np.int64 and table.pool_labels.dtype == np.int64
        assert table.similarity.dtype == torch.float32 and table.class_similarity.dtype == torch.float32
