"""Methods: prompt construction, BioVLM's loss terms against an independent computation, gradients into the bank,
and every method through the same build / fit / predict / checkpoint interface."""

from __future__ import annotations

import math
import re
import statistics
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from torch import nn

from biovlm import prompts
from biovlm.data import get_dataset
from biovlm.methods import METHOD_NAMES, NotTransferable, build_method
from biovlm.methods.losses import entropy_of_mean, kl_distill, text_alignment
from biovlm.train import fit, predict

INFO = get_dataset("bloodmnist")  # 8 classes
ATTRS = [[f"{w} granules", f"{w} nucleus", f"{w} membrane"] for w in
         ("round", "lobed", "pale", "dark", "small", "large", "smooth", "rough")]
SMALL = {"train": {"epochs": 2, "batch_size": 8, "lr": 0.01}}


def synthetic_features(d: int, n_classes: int, shots: int = 4, views: int = 2, seed: int = 0, noise: float = 0.3):
    """A FeatureSet-shaped object: class prototypes plus noise, L2-normalised."""
    g = torch.Generator().manual_seed(seed)
    proto = F.normalize(torch.randn(n_classes, d, generator=g), dim=-1)

    def draw(labels, *extra):
        x = proto[labels].view(len(labels), *([1] * len(extra)), d)
        return F.normalize(x + noise * torch.randn(len(labels), *extra, d, generator=g), dim=-1)

    pool = torch.arange(n_classes).repeat_interleave(shots)
    val = torch.arange(n_classes).repeat(2)
    test = torch.arange(n_classes).repeat(5)
    return SimpleNamespace(pool_labels=pool, pool_clean=draw(pool),
                           pool_views={k: draw(pool, views) for k in ("plain", "weak", "strong")},
                           val_features=draw(val), val_labels=val, test_features=draw(test), test_labels=test)


def fixed_batch(d: int, n_classes: int, b: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = {k: F.normalize(torch.randn(b, d, generator=g), dim=-1) for k in ("plain", "weak", "strong", "clean")}
    return {**views, "labels": torch.arange(b) % n_classes}


# ---- prompt construction --------------------------------------------------------------------------------------
def _one_token_words(backbone, candidates, n):
    words = [w for w in candidates if backbone.tokenize([w])[1].sum().item() == 3]  # start, word, end
    assert len(words) >= n, f"need {n} single-token words, got {words}"
    return words[:n]


@pytest.mark.parametrize("backbone_name", ["tiny", "tiny-clip"])
def test_learned_prompt_equals_the_same_text_encoded_directly(backbone_name, tiny_backbone):
    from biovlm.backbone import load_backbone

    bb = tiny_backbone if backbone_name == "tiny" else load_backbone(backbone_name)
    coop = build_method("coop", bb, {"coop": {"n_ctx": 4}}, INFO)
    names = list(INFO.prompt_names)[:3]
    words = _one_token_words(bb, ["blood", "cell", "image", "of", "the", "with", "a", "and", "cells"], 4)
    ids, _ = bb.tokenize([" ".join(words)])
    with torch.no_grad():
        coop.ctx.copy_(bb.token_embeddings(ids)[0, 1:5][None].float())
        learned = coop.prompt_features(names)[0]
    direct = bb.encode_texts([" ".join(words) + f" {n}." for n in names]).float()
    assert torch.allclose(learned, direct, atol=1e-5)
    # and the placeholder prompt itself: "X X X X <name>." (positions 1..4)
    ph_ids, _ = bb.tokenize([prompts.PLACEHOLDER])
    with torch.no_grad():
        coop.ctx.copy_(bb.token_embeddings(ph_ids)[0, 1][None, None].float().expand(1, 4, -1))
        learned = coop.prompt_features(names)[0]
    direct = bb.encode_texts([prompts.context_prompt(n, 4) for n in names]).float()
    assert torch.allclose(learned, direct, atol=1e-5)


def test_constant_prompt_parts_are_tokenized_once_per_class_list(tiny_backbone, monkeypatch):
    m = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 3}}, INFO, attributes=ATTRS)
    calls = []
    real = tiny_backbone.tokenize
    monkeypatch.setattr(tiny_backbone, "tokenize", lambda texts: calls.append(list(texts)) or real(texts))
    a, b = list(INFO.prompt_names)[:4], list(INFO.prompt_names)[4:]
    for _ in range(3):
        m.prompt_features(a)
        m.prompt_features(b)
    assert len([c for c in calls if len(c) > 1]) == 2  # one batched tokenization per class list
    assert m.prompt_features(a).shape == (3, 4, tiny_backbone.embed_dim)


def test_attribute_texts_are_encoded_once(tiny_backbone, monkeypatch):
    m = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 2}}, INFO, attributes=ATTRS)
    calls = []
    real = tiny_backbone.encode_texts
    monkeypatch.setattr(tiny_backbone, "encode_texts", lambda t, **k: calls.append(len(t)) or real(t, **k))
    batch = fixed_batch(tiny_backbone.embed_dim, INFO.n_classes)
    for _ in range(3):
        m.loss(batch)
    assert calls == [len(ATTRS) * 3]


def test_ctx_init_phrase_must_match_n_ctx(tiny_backbone):
    words = _one_token_words(tiny_backbone, ["blood", "cell", "image", "of", "the", "with", "a"], 3)
    phrase = " ".join(words)
    m = build_method("coop", tiny_backbone, {"coop": {"n_ctx": 3, "ctx_init": phrase}}, INFO)
    ids, _ = tiny_backbone.tokenize([phrase])
    assert torch.allclose(m.ctx[0], tiny_backbone.token_embeddings(ids)[0, 1:4].float())
    bank = build_method("biovlm", tiny_backbone, {"biovlm": {"n_ctx": 3, "ctx_init": phrase, "bank_size": 3}},
                        INFO, attributes=ATTRS)
    assert torch.equal(bank.ctx[0], m.ctx[0]) and not torch.equal(bank.ctx[1], bank.ctx[0])
    with pytest.raises(ValueError, match="has 3 tokens but n_ctx is 4"):
        build_method("coop", tiny_backbone, {"coop": {"n_ctx": 4, "ctx_init": phrase}}, INFO)


# ---- loss functions on fixed tensors ---------------------------------------------------------------------------
def test_entropy_of_mean_matches_definition():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], [[5.0, 5.0, 5.0], [9.0, 0.0, 0.0]]])
    expected = 0.0
    for b in range(2):
        p = [(math.exp(logits[b, 0, c]) / sum(math.exp(u) for u in logits[b, 0].tolist())
              + math.exp(logits[b, 1, c]) / sum(math.exp(u) for u in logits[b, 1].tolist())) / 2 for c in range(3)]
        expected += -sum(q * math.log(q) for q in p) / 2
    assert entropy_of_mean(logits).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_kl_distill_matches_definition(tau):
    s = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 2.0, 0.0, 0.0]])
    t = torch.tensor([[0.0, 1.0, 0.0, 0.0], [3.0, 0.0, 1.0, -2.0]])
    total = 0.0
    for b in range(2):
        ps = torch.softmax(s[b] / tau, 0).tolist()
        pt = torch.softmax(t[b] / tau, 0).tolist()
        total += sum(q * (math.log(q) - math.log(r)) for q, r in zip(pt, ps, strict=True))
    total *= tau**2
    assert kl_distill(s, t, tau).item() == pytest.approx(total / 2, rel=1e-5)
    assert kl_distill(s, t, tau, "reference", n_members=5).item() == pytest.approx(total / (2 * 5 * 4), rel=1e-5)
    with pytest.raises(ValueError, match="kl_reduction"):
        kl_distill(s, t, tau, "sum")


def test_kl_distill_defaults_dtype_and_errors():
    """Defaults: tau 1, "batchmean", one member; half-precision logits are compared in float32; the teacher is a
    constant (no gradient flows into it)."""
    s = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 0.5]], requires_grad=True)
    t = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, -2.0]], requires_grad=True)
    by_hand = sum((torch.softmax(t[b], 0) * (torch.log_softmax(t[b], 0) - torch.log_softmax(s[b], 0))).sum()
                  for b in range(2)).item()
    assert kl_distill(s, t).item() == pytest.approx(by_hand / 2, rel=1e-5)
    assert kl_distill(s, t, 1.0, "reference").item() == pytest.approx(by_hand / (2 * 3), rel=1e-5)
    half = kl_distill(s.half(), t.half(), 2.0)
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx(kl_distill(s.half().float(), t.half().float(), 2.0).item(), rel=1e-6)
    kl_distill(s, t, 2.0).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"^kl_reduction must be one of \('batchmean', 'reference'\), got 'sum'$"):
        kl_distill(s, t, 1.0, "sum")
    for tau in (0, -1.0):
        with pytest.raises(ValueError, match=f"^KL temperature tau must be > 0, got {tau}$"):
            kl_distill(s, t, tau)


def test_entropy_of_mean_is_over_members_in_float32():
    logits = torch.tensor([[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 3.0]]])
    p = torch.softmax(logits[0].double(), -1).mean(0)
    value = entropy_of_mean(logits.half())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(-(p * p.log()).sum().item(), rel=1e-3)


def test_text_alignment_of_short_vectors_is_scale_free():
    """The cosine divides by the norms (eps only guards zero vectors): vectors of norm 0.01 align like unit ones."""
    a = torch.tensor([[0.01, 0.0], [0.0, 0.02]])
    b = torch.tensor([[0.01, 0.01], [0.0, 0.005]])
    assert text_alignment(a, b).item() == pytest.approx(1 - (math.sqrt(0.5) + 1) / 2, rel=1e-6)
    assert text_alignment(a.half(), b.half()).dtype == torch.float32
    # eps = 1e-7 floors each norm: a zero feature is unaligned (cos 0), one of norm 1e-8 counts as 1e-8 / 1e-7
    assert text_alignment(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(1.0)
    assert text_alignment(torch.tensor([[1e-8, 0.0]]), torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.9)


def test_text_alignment_is_cosine_over_the_feature_axis():
    a = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    b = torch.tensor([[1.0, 1.0, 0.0], [0.0, -3.0, 0.0]])
    assert text_alignment(a, b).item() == pytest.approx(1 - (math.sqrt(0.5) - 1) / 2, rel=1e-6)


# ---- BioVLM: each term against an independent computation ------------------------------------------------------
def _keep(rows: list[list[float]], ratio: float) -> list[int]:
    """Indices of the ceil(ratio * M) lowest-entropy rows (ties: lower index first), computed in plain Python."""
    def entropy(row):
        z = [math.exp(v - max(row)) for v in row]
        p = [v / sum(z) for v in z]
        return -sum(q * math.log(q) for q in p if q > 0)

    k = max(1, math.ceil(ratio * len(rows) - 1e-9))
    return sorted(range(len(rows)), key=lambda m: (entropy(rows[m]), m))[:k]


def test_biovlm_terms_equal_an_independent_computation(tiny_backbone):
    knobs = {"bank_size": 4, "select_ratio": 0.5, "teacher_ratio": 0.34, "tau": 2.0,
             "l_ent": 0.3, "l_kd": 0.7, "l_aug": 1.1, "l_cos": 0.9, "kl_reduction": "batchmean"}
    m = build_method("biovlm", tiny_backbone, {"biovlm": knobs}, INFO, attributes=ATTRS)
    with torch.no_grad():  # a visibly different bank than the tiny tower's collapsed defaults
        m.ctx.mul_(50)
    # The random tower's texts are nearly parallel: a large logit scale keeps the KL terms far above float32
    # cancellation noise (at the tower's own scale they are ~1e-5).
    m.scale = scale = 20 * tiny_backbone.logit_scale
    batch = fixed_batch(tiny_backbone.embed_dim, INFO.n_classes)
    terms, _ = m.loss_terms(batch)
    total, stats = m.loss(batch)

    names = list(INFO.prompt_names)
    text = m.prompt_features(names).detach()  # [M, C, D] (its construction is tested above)
    attr = [tiny_backbone.encode_texts([prompts.attribute_text(INFO, n, a) for a in attrs]).float()
            for n, attrs in zip(names, ATTRS, strict=True)]  # per class [J, D]
    ce = ent = kd = aug = 0.0
    b_size = batch["labels"].numel()
    for b in range(b_size):
        f = batch["plain"][b]
        members = [(scale * text[j] @ f).tolist() for j in range(4)]
        kept = _keep(members, 0.5)
        routed = torch.tensor(members)[kept].mean(0)
        ce += -torch.log_softmax(routed, 0)[batch["labels"][b]].item() / b_size
        p = torch.stack([torch.softmax(torch.tensor(members[i]), 0) for i in kept]).mean(0)
        ent += -(p * p.log()).sum().item() / b_size

        def teacher(views):
            rows = [(scale * torch.stack([a[j] for a in attr]) @ v).tolist() for v in views for j in range(3)]
            return torch.tensor(rows)[_keep(rows, 0.34)].mean(0)

        for t, acc in ((teacher([f]), "kd"), (teacher([batch["weak"][b], batch["strong"][b]]), "aug")):
            pt, ps = torch.softmax(t / 2, 0), torch.softmax(routed / 2, 0)
            value = 4 * (pt * (pt.log() - ps.log())).sum().item() / b_size
            if acc == "kd":
                kd += value
            else:
                aug += value
    mean_attr = torch.stack([F.normalize(a, dim=-1).mean(0) for a in attr])
    cos = 1 - F.cosine_similarity(text.mean(0), mean_attr, dim=-1).mean().item()

    expected = {"ce": ce, "ent": ent, "kd": kd, "aug": aug, "cos": cos}
    assert set(terms) == set(expected)
    for name, value in expected.items():
        assert terms[name].item() == pytest.approx(value, rel=1e-4, abs=1e-6), name
        assert stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    weighted = ce + 0.3 * ent + 0.7 * kd + 1.1 * aug + 0.9 * cos
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    assert stats["loss"] == pytest.approx(weighted, rel=1e-5)


@pytest.mark.parametrize("off", ["l_ent", "l_kd", "l_aug", "l_cos"])
def test_a_zero_weight_removes_its_term(off, tiny_backbone):
    knobs = {"bank_size": 3, "l_ent": 0.5, "l_kd": 0.5, "l_aug": 0.5, "l_cos": 0.5}
    batch = fixed_batch(tiny_backbone.embed_dim, INFO.n_classes)
    full = build_method("biovlm", tiny_backbone, {"biovlm": knobs}, INFO, attributes=ATTRS)
    less = build_method("biovlm", tiny_backbone, {"biovlm": {**knobs, off: 0}}, INFO, attributes=ATTRS)
    _, s_full = full.loss(batch)
    total, s_less = less.loss(batch)
    term = {"l_ent": "ent", "l_kd": "kd", "l_aug": "aug", "l_cos": "cos"}[off]
    assert term in s_full and term not in s_less
    assert total.item() == pytest.approx(s_full["loss"] - 0.5 * s_full[term], rel=1e-5)


def test_without_teacher_or_cosine_no_attribute_is_needed(tiny_backbone, monkeypatch):
    knobs = {"biovlm": {"bank_size": 2, "l_kd": 0, "l_aug": 0, "l_cos": 0}}
    m = build_method("biovlm", tiny_backbone, knobs, INFO, attributes=None)
    monkeypatch.setattr(tiny_backbone, "encode_texts", lambda *a, **k: pytest.fail("no constant text needed"))
    _, stats = m.loss(fixed_batch(tiny_backbone.embed_dim, INFO.n_classes))
    assert set(stats) == {"loss", "ce", "ent", "acc"}
    with pytest.raises(ValueError, match="needs attributes by label id"):
        build_method("biovlm", tiny_backbone, {"biovlm": {"l_cos": 0.1}}, INFO, attributes=None)


@pytest.mark.parametrize("term", ["ce", "ent", "kd", "aug", "cos"])
def test_gradient_reaches_the_bank_through_each_term(term, tiny_backbone):
    m = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 4}}, INFO, attributes=ATTRS)
    terms, _ = m.loss_terms(fixed_batch(tiny_backbone.embed_dim, INFO.n_classes))
    (grad,) = torch.autograd.grad(terms[term], m.ctx)
    assert torch.isfinite(grad).all()
    assert grad.abs().sum().item() > 0
    # routing keeps 2 of 4 members per image; the members that are never kept get no gradient from ce/ent/kd/aug
    # but every member gets one from the cosine term (the mean over the whole bank)
    if term == "cos":
        assert (grad.flatten(1).abs().sum(1) > 0).all()


# ---- every method through the same interface ------------------------------------------------------------------
@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_method_trains_predicts_and_round_trips(name, tiny_backbone):
    d = tiny_backbone.embed_dim
    feats = synthetic_features(d, INFO.n_classes)
    base = [0, 1, 2, 3]
    cfg = {**SMALL, "biovlm": {"bank_size": 3}}
    m = build_method(name, tiny_backbone, cfg, INFO, attributes=ATTRS, class_ids=base)
    positions = [i for i, y in enumerate(feats.pool_labels.tolist()) if y in base]
    history = fit(m, feats, positions, cfg, seed=0)
    assert len(history["epochs"]) == (2 if m.trainable else 0)
    for record in history["epochs"]:
        assert {"loss", "acc", "lr", "val_acc"} <= set(record) and math.isfinite(record["loss"])

    base_names = [INFO.prompt_names[i] for i in base]
    base_attrs = [ATTRS[i] for i in base]
    probs = predict(m, feats.test_features, base_names, INFO, base_attrs, batch_size=7)
    assert probs.shape == (len(feats.test_labels), 4)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)

    state = m.checkpoint()
    assert state["meta"]["method"] == name and state["meta"]["class_ids"] == base
    assert sum(t.numel() for t in state["tensors"].values()) < 100_000  # learned tensors only, no tower
    again = build_method(name, tiny_backbone, cfg, INFO, attributes=ATTRS, class_ids=base)
    again.load_checkpoint(state)
    assert torch.allclose(predict(again, feats.test_features, base_names, INFO, base_attrs), probs, atol=1e-6)

    novel = [INFO.prompt_names[i] for i in range(4, 8)]
    other = get_dataset("pathmnist")
    assert m.class_specific == (name == "linear_probe")
    if name == "linear_probe":
        with pytest.raises(NotTransferable, match="cannot classify unseen classes"):
            predict(m, feats.test_features, novel, INFO, [ATTRS[i] for i in range(4, 8)])
        return
    probs = predict(m, feats.test_features, novel, INFO, [ATTRS[i] for i in range(4, 8)])
    assert probs.shape == (len(feats.test_labels), 4)
    other_attrs = [["dense texture", "pale texture"] for _ in other.prompt_names]
    probs = predict(m, feats.test_features, list(other.prompt_names), other, other_attrs)
    assert probs.shape == (len(feats.test_labels), other.n_classes)
    assert torch.isfinite(probs).all()


def test_linear_probe_on_two_classes_equals_sklearns_probabilities(tiny_backbone):
    info = get_dataset("breastmnist")
    feats = synthetic_features(tiny_backbone.embed_dim, 2, shots=6, noise=0.8)
    m = build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": 3.0}}, info)
    fit(m, feats, range(len(feats.pool_labels)), {}, seed=0)
    clf = LogisticRegression(C=3.0, max_iter=1000, tol=1e-4).fit(feats.pool_clean.double().numpy(),
                                                                 feats.pool_labels.numpy())
    expected = clf.predict_proba(feats.test_features.double().numpy())
    probs = predict(m, feats.test_features, list(info.prompt_names), info)
    np.testing.assert_allclose(probs.numpy(), expected, atol=1e-5)


def test_linear_probe_fits_separable_features_and_serves_a_subset(tiny_backbone):
    feats = synthetic_features(tiny_backbone.embed_dim, INFO.n_classes, shots=8, noise=0.1)
    m = build_method("linear_probe", tiny_backbone, {}, INFO)
    fit(m, feats, range(len(feats.pool_labels)), {}, seed=0)
    acc = (predict(m, feats.test_features, list(INFO.prompt_names), INFO).argmax(1) == feats.test_labels)
    assert acc.float().mean().item() > 0.9
    sub = [INFO.prompt_names[5], INFO.prompt_names[2]]
    full = m.logits(feats.test_features, list(INFO.prompt_names), INFO)
    assert torch.allclose(m.logits(feats.test_features, sub, INFO), full[:, [5, 2]])
    with pytest.raises(ValueError, match="linear_probe.tol must be > 0, got 0"):
        build_method("linear_probe", tiny_backbone, {"linear_probe": {"tol": 0}}, INFO)


def test_c_search_follows_coops_grid_then_bisection():
    """Validation accuracy peaks at C = 10^2.3: the grid finds 1e2, then 8 bisection steps between 10^1 and 10^3
    keep the better end (the smaller C on ties) and halve towards it."""
    from biovlm.methods.linear_probe import SEARCH_GRID, search_c

    def accuracy(c):
        return round(1 - abs(math.log10(c) - 2.3) / 20, 6)

    chosen, tried = search_c(accuracy, steps=8)
    assert [c for c, _ in tried[:7]] == list(SEARCH_GRID) and len(tried) == 7 + 2 * 8
    assert tried[7][0] == pytest.approx(10.0) and tried[8][0] == pytest.approx(1000.0)
    assert math.log10(chosen) == pytest.approx(2.3, abs=2 / 2**8)
    flat, _ = search_c(lambda c: 0.5, steps=3)  # ties: the first grid value, then always the left (smaller) end
    assert flat == pytest.approx(10 ** (6 - 1))
    assert search_c(accuracy, steps=0)[0] == pytest.approx(100.0)


def test_linear_probe_chooses_c_on_the_runs_validation_shots(tiny_backbone):
    feats = synthetic_features(tiny_backbone.embed_dim, INFO.n_classes, shots=4, noise=0.3)
    cfg = {"linear_probe": {"search_steps": 3}}
    chosen = []
    for rows in (range(0, 8), range(8, 16)):  # two validation sets of the same run (one image per class each)
        m = build_method("linear_probe", tiny_backbone, cfg, INFO)
        fit(m, feats, range(len(feats.pool_labels)), cfg, seed=0, val_rows=np.array(list(rows)))
        meta = m.checkpoint()["meta"]
        assert meta["C"] == m.chosen_c and len(meta["C_search"]) == 7 + 2 * 3
        vx, vy = feats.val_features[list(rows)].double().numpy(), feats.val_labels[list(rows)].numpy()
        x, y = feats.pool_clean.double().numpy(), feats.pool_labels.numpy()
        for c, acc in meta["C_search"][:3]:  # each recorded accuracy is that C's validation accuracy
            clf = LogisticRegression(C=c, max_iter=1000, tol=1e-4).fit(x, y)
            assert acc == pytest.approx(float((clf.predict(vx) == vy).mean()))
        best_grid = max(meta["C_search"][:7], key=lambda t: t[1])
        assert 0.1 * best_grid[0] <= m.chosen_c <= 10 * best_grid[0]  # bisection stays around the best grid C
        chosen.append((m.chosen_c, [acc for _, acc in meta["C_search"]]))
    assert chosen[0][1] != chosen[1][1] and chosen[0][0] != chosen[1][0]  # another validation set, another C
    fixed = build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": 100.0}}, INFO)
    fit(fixed, feats, range(len(feats.pool_labels)), {}, seed=0)
    assert fixed.checkpoint()["meta"]["C"] == 100.0 and fixed.search == []
    feats.val_labels = None
    with pytest.raises(ValueError, match="search chooses C on validation shots, and this run has none"):
        fit(build_method("linear_probe", tiny_backbone, {}, INFO), feats, range(len(feats.pool_labels)), {}, seed=0)
    with pytest.raises(ValueError, match="linear_probe.C must be 'search' .* or a number > 0, got 'best'"):
        build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": "best"}}, INFO)


def test_method_errors_are_clear(tiny_backbone):
    with pytest.raises(ValueError, match="unknown method 'coopp'; valid methods: zeroshot, "):
        build_method("coopp", tiny_backbone, {}, INFO)
    for bad in (0, 0.0, 1.5, -1):
        with pytest.raises(ValueError, match=r"biovlm.select_ratio must be in \(0, 1\]"):
            build_method("biovlm", tiny_backbone, {"biovlm": {"select_ratio": bad}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match=r"biovlm.teacher_ratio must be in \(0, 1\]"):
        build_method("biovlm", tiny_backbone, {"biovlm": {"teacher_ratio": 2}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match=r"unknown knob\(s\) \['bank'\] for method 'biovlm'; valid knobs: "):
        build_method("biovlm", tiny_backbone, {"biovlm": {"bank": 3}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match="biovlm.bank_size must be a positive integer"):
        build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 0}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match="biovlm.l_kd must be a number >= 0"):
        build_method("biovlm", tiny_backbone, {"biovlm": {"l_kd": -1}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match="kl_reduction must be one of"):
        build_method("biovlm", tiny_backbone, {"biovlm": {"kl_reduction": "mean"}}, INFO, attributes=ATTRS)
    with pytest.raises(ValueError, match="needs attributes by label id"):
        build_method("biomedcoop", tiny_backbone, {}, INFO)
    with pytest.raises(TypeError, match="pass class_ids by keyword"):
        build_method("coop", tiny_backbone, {}, INFO, [0, 1])
    with pytest.raises(ValueError, match="out of range"):
        build_method("coop", tiny_backbone, {}, INFO, class_ids=[0, 8])
    m = build_method("zeroshot_attr", tiny_backbone, {}, INFO)
    with pytest.raises(ValueError, match="needs the attributes"):
        m.logits(torch.zeros(1, tiny_backbone.embed_dim), ["a", "b"], INFO)
    coop = build_method("coop", tiny_backbone, {}, INFO)
    with pytest.raises(ValueError, match="checkpoint is for method 'coop', not 'kgcoop'"):
        build_method("kgcoop", tiny_backbone, {}, INFO).load_checkpoint(coop.checkpoint())


def test_biomedcoop_prunes_outlier_attributes():
    from biovlm.methods.biomedcoop import prune_mask

    scores = torch.tensor([10.0, 10.2, 9.9, 10.1, 25.0, 10.05, -3.0])  # mean 10.32, std 8.10: z 1.81 and -1.65
    assert prune_mask(scores, 1.5).tolist() == [True, True, True, True, False, True, False]
    assert prune_mask(torch.full((4,), 3.0), 1.5).all()  # std 0: nothing to prune
    single = prune_mask(torch.tensor([7.0]), 0.1)  # one classifier: no spread to measure
    assert single.dtype == torch.bool and single.tolist() == [True]  # a mask: it indexes the classifiers


# ---- the baselines' losses and logits against an independent computation -----------------------------------
# As for BioVLM above, with plain torch formulas written out here. The tiny tower's text features are nearly
# parallel, so these tests scale the learned context up and use a large logit scale: the terms are then far above
# float32 noise, and a wrong weight or a wrong formula shows.
NAMES = list(INFO.prompt_names)
WORDS = ("round", "lobed", "pale", "dark", "small", "large", "smooth", "rough")
# five attributes per class: on the shots of shots_of() the robust z-score prunes attribute 3 (and only it)
ATTRS5 = [[f"{w} granules", f"{w} nucleus", f"{w} membrane", f"{w} shape", f"{w} edge"] for w in WORDS]


def batch_of(d: int, b: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    views = {k: F.normalize(torch.randn(b, d, generator=g), dim=-1) for k in ("plain", "weak", "strong", "clean")}
    return {**views, "labels": torch.tensor([0, 3, 5, 7, 2, 3][:b])}


def shots_of(d: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return F.normalize(torch.randn(16, d, generator=g), dim=-1), torch.arange(16) % 8


def cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """mean_b (log sum_c exp(l_bc) - l_b,y_b), one image at a time."""
    rows = [math.log(sum(math.exp(v) for v in row.tolist())) - row[y].item()
            for row, y in zip(logits, labels.tolist(), strict=True)]
    return sum(rows) / len(rows)


def kl_by_hand(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> float:
    """tau^2 * sum over images and classes of p_t (log p_t - log p_s), softmaxes at temperature tau."""
    total = 0.0
    for s, t in zip(student.tolist(), teacher.tolist(), strict=True):
        zs = sum(math.exp(v / tau) for v in s)
        zt = sum(math.exp(v / tau) for v in t)
        for vs, vt in zip(s, t, strict=True):
            pt = math.exp(vt / tau) / zt
            total += pt * (math.log(pt) - math.log(math.exp(vs / tau) / zs))
    return tau**2 * total


def accuracy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return sum(int(max(range(len(r)), key=r.__getitem__) == y)
               for r, y in zip(logits.tolist(), labels.tolist(), strict=True)) / len(labels)


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def template_by_hand(backbone, names=NAMES) -> torch.Tensor:
    return unit(backbone.encode_texts([prompts.template_text(INFO, n) for n in names]).float())


def attributes_by_hand(backbone, attrs=ATTRS5) -> list[torch.Tensor]:
    """Per class: [J, D] unit features of its attribute texts."""
    return [unit(backbone.encode_texts([prompts.attribute_text(INFO, n, a) for a in al]).float())
            for n, al in zip(NAMES, attrs, strict=True)]


def prompt_method(name: str, backbone, knobs: dict, attributes=None):
    m = build_method(name, backbone, {name: knobs}, INFO, attributes=attributes)
    with torch.no_grad():
        m.ctx.mul_(50)  # a visibly different context than the tiny tower's near-zero default
    m.scale = 20 * backbone.logit_scale
    return m


def check_stats(stats: dict, expected: dict, total: torch.Tensor, weighted: float):
    assert set(stats) == {"loss", "acc", *expected}
    for name, value in expected.items():
        assert stats[name] == pytest.approx(value, rel=1e-3, abs=1e-9), name
    assert total.item() == pytest.approx(weighted, rel=1e-5)
    assert stats["loss"] == pytest.approx(weighted, rel=1e-5)


# ---- CoOp ----------------------------------------------------------------------------------------------------
def test_coop_loss_is_the_cross_entropy_of_scaled_cosines(tiny_backbone):
    m = prompt_method("coop", tiny_backbone, {})
    batch = batch_of(tiny_backbone.embed_dim)
    total, stats = m.loss(batch)
    text = m.prompt_features(NAMES)[0].detach()
    logits = torch.stack([torch.stack([m.scale * (f * t).sum() for t in text]) for f in batch["plain"]])
    ce = cross_entropy_by_hand(logits, batch["labels"])
    assert ce > 0.1
    check_stats(stats, {"ce": ce, "acc": accuracy_by_hand(logits, batch["labels"])}, total, ce)
    assert torch.allclose(m.logits(batch["plain"], NAMES, INFO), logits, atol=1e-4)


# ---- CoCoOp --------------------------------------------------------------------------------------------------
def test_cocoop_shifts_the_context_per_image_through_the_meta_network(tiny_backbone):
    m = prompt_method("cocoop", tiny_backbone, {"meta_reduction": 8})
    d = tiny_backbone.embed_dim
    lin1, lin2 = m.meta_net[0], m.meta_net[2]
    assert (lin1.in_features, lin1.out_features, lin2.out_features) == (d, d // 8, tiny_backbone.text_width)
    with torch.no_grad():  # a meta-network whose shift matters
        lin2.weight.mul_(200)
    batch = batch_of(d)
    total, stats = m.loss(batch)
    rows = []
    for f in batch["plain"]:  # one image at a time: its own context, its own prompts
        shift = lin2.weight @ torch.clamp(lin1.weight @ f + lin1.bias, min=0) + lin2.bias
        text = m.tokens.encode((m.ctx[0] + shift)[None], NAMES)[0].detach()
        rows.append(m.scale * text @ f)
    logits = torch.stack(rows)
    still = m.tokens.encode(m.ctx[:1], NAMES)[0].detach() @ batch["plain"].T
    assert not torch.allclose(logits, m.scale * still.T, atol=1e-2)  # the shift changes the logits
    ce = cross_entropy_by_hand(logits, batch["labels"])
    check_stats(stats, {"ce": ce, "acc": accuracy_by_hand(logits, batch["labels"])}, total, ce)
    assert torch.allclose(m.logits(batch["plain"], NAMES, INFO), logits, atol=1e-3)


def test_cocoop_meta_network_width_and_its_floor(tiny_backbone):
    d = tiny_backbone.embed_dim
    assert build_method("cocoop", tiny_backbone, {}, INFO).meta_net[0].out_features == d // 16
    assert build_method("cocoop", tiny_backbone, {"cocoop": {"meta_reduction": 1}}, INFO).meta_net[0].out_features == d
    assert build_method("cocoop", tiny_backbone, {"cocoop": {"meta_reduction": 4 * d}},
                        INFO).meta_net[0].out_features == 1
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ValueError, match=f"^cocoop.meta_reduction must be a positive integer, got {bad!r}$"):
            build_method("cocoop", tiny_backbone, {"cocoop": {"meta_reduction": bad}}, INFO)


def _uniform(generator, shape, bound):
    return torch.rand(shape, generator=generator) * (2 * bound) - bound


def test_cocoop_reset_draws_nn_linears_default_init_from_the_generator(tiny_backbone):
    """Context N(0, 0.02), then each Linear's weight and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in)), in that order."""
    m = build_method("cocoop", tiny_backbone, {}, INFO)
    m.reset_parameters(torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    ctx = torch.randn(1, 4, tiny_backbone.text_width, generator=g) * 0.02
    assert torch.allclose(m.ctx.detach(), ctx)
    for layer in (m.meta_net[0], m.meta_net[2]):
        bound = 1 / math.sqrt(layer.in_features)
        assert torch.allclose(layer.weight.detach(), _uniform(g, layer.weight.shape, bound), atol=1e-7)
        assert torch.allclose(layer.bias.detach(), _uniform(g, layer.bias.shape, bound), atol=1e-7)


# ---- KgCoOp --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weight", [3.0, 0.5, 0.0])
def test_kgcoop_loss_is_ce_plus_weight_times_one_minus_cosine_to_the_template(weight, tiny_backbone):
    m = prompt_method("kgcoop", tiny_backbone, {"weight": weight})
    batch = batch_of(tiny_backbone.embed_dim)
    total, stats = m.loss(batch)
    text = m.prompt_features(NAMES)[0].detach()
    logits = m.scale * batch["plain"] @ text.T
    ce = cross_entropy_by_hand(logits, batch["labels"])
    template = template_by_hand(tiny_backbone)
    kg = 1 - sum((unit(t) * a).sum().item() for t, a in zip(text, template, strict=True)) / len(NAMES)
    assert kg > 5e-5  # the tiny tower maps every prompt close to the template: small, yet far above float noise
    expected = {"ce": ce, "acc": accuracy_by_hand(logits, batch["labels"])}
    if weight:
        expected["kg"] = kg
    check_stats(stats, expected, total, ce + weight * kg)


def test_kgcoop_weight_must_be_non_negative(tiny_backbone):
    with pytest.raises(ValueError, match="^kgcoop.weight must be a number >= 0, got -1.0$"):
        build_method("kgcoop", tiny_backbone, {"kgcoop": {"weight": -1.0}}, INFO)


# ---- BiomedCoOp ----------------------------------------------------------------------------------------------
KEPT_AT_1_5 = [1, 2, 3, 4]  # attribute 0 is the outlier on batch_of()'s images
KEPT_AT_0_5 = [1, 2, 3]


def _prune_by_hand(scores: list[float], threshold: float) -> list[int]:
    """The public code's rule: the robust z-score standardised again, i.e. the z-score (unbiased std)."""
    med = statistics.median_low(scores)
    mad = statistics.median_low([abs(s - med) for s in scores])
    robust = [(s - med) / mad for s in scores]
    mean, std = statistics.mean(robust), statistics.stdev(robust)
    return [j for j, z in enumerate(robust) if abs((z - mean) / std) <= threshold]


def _teacher_by_hand(backbone, scale, images, prune_z):
    """Attribute classifier j = attribute j of every class; its score = mean over the batch of the max logit."""
    attr = attributes_by_hand(backbone)
    classifiers = [torch.stack([a[j] for a in attr]) for j in range(len(ATTRS5[0]))]  # J x [C, D]
    scores = [max_logits.mean().item() for max_logits in
              ((scale * images @ c.T).max(dim=1).values for c in classifiers)]
    kept = _prune_by_hand(scores, prune_z)
    return kept, unit(torch.stack([classifiers[j] for j in kept]).mean(0))


@pytest.mark.parametrize(("reduction", "tau", "kdsp_lambda"), [("reference", 1.0, 1.3), ("batchmean", 2.0, 0.7)])
def test_biomedcoop_loss_equals_an_independent_computation(reduction, tau, kdsp_lambda, tiny_backbone):
    # the tiny tower's prompts sit close to the attribute means: a large sccm weight makes that term visible; a kdsp
    # weight below 1 must count too
    knobs = {"sccm_lambda": 40.0, "kdsp_lambda": kdsp_lambda, "tau": tau, "kl_reduction": reduction}
    m = prompt_method("biomedcoop", tiny_backbone, knobs, attributes=ATTRS5)
    batch = batch_of(tiny_backbone.embed_dim)
    kept, teacher_text = _teacher_by_hand(tiny_backbone, m.scale, batch["plain"], 1.5)
    assert kept == KEPT_AT_1_5  # an outlier pruned on this batch: the test sees whether pruning happens
    total, stats = m.loss(batch)
    text = m.prompt_features(NAMES)[0].detach()
    logits = m.scale * batch["plain"] @ text.T
    ce = cross_entropy_by_hand(logits, batch["labels"])
    mean_attr = unit(torch.stack([a.mean(0) for a in attributes_by_hand(tiny_backbone)]))
    sccm = ((text - mean_attr) ** 2).sum().item() / text.numel()
    teacher = m.scale * batch["plain"] @ teacher_text.T
    b, c = logits.shape
    kdsp = kl_by_hand(logits, teacher, tau) / (b * c if reduction == "reference" else b)
    assert sccm > 1e-6 and kdsp > 1e-4
    expected = {"ce": ce, "sccm": sccm, "kdsp": kdsp, "acc": accuracy_by_hand(logits, batch["labels"])}
    check_stats(stats, expected, total, ce + 40.0 * sccm + kdsp_lambda * kdsp)


def test_biomedcoop_prune_threshold_is_the_knob(tiny_backbone):
    batch = batch_of(tiny_backbone.embed_dim)
    m = prompt_method("biomedcoop", tiny_backbone, {"prune_z": 0.5}, attributes=ATTRS5)
    kept, teacher_text = _teacher_by_hand(tiny_backbone, m.scale, batch["plain"], 0.5)
    assert kept == KEPT_AT_0_5 and len(kept) < len(KEPT_AT_1_5)
    assert torch.allclose(m.teacher(batch["plain"]), teacher_text, atol=1e-6)
    # scored by the max over classes, averaged over the batch (the other way round keeps other classifiers here)
    tight = prompt_method("biomedcoop", tiny_backbone, {"prune_z": 0.3}, attributes=ATTRS5)
    kept, teacher_text = _teacher_by_hand(tiny_backbone, tight.scale, batch["plain"], 0.3)
    assert kept == [2] and torch.allclose(tight.teacher(batch["plain"]), teacher_text, atol=1e-6)


def test_biomedcoop_without_kdsp_needs_no_teacher_and_without_both_no_attributes(tiny_backbone):
    batch = batch_of(tiny_backbone.embed_dim)
    m = prompt_method("biomedcoop", tiny_backbone, {"kdsp_lambda": 0.0, "sccm_lambda": 0.5}, attributes=ATTRS5)
    _, stats = m.loss(batch)
    assert set(stats) == {"loss", "ce", "sccm", "acc"}
    plain = prompt_method("biomedcoop", tiny_backbone, {"kdsp_lambda": 0.0, "sccm_lambda": 0.0})
    total, stats = plain.loss(batch)
    assert set(stats) == {"loss", "ce", "acc"} and total.item() == pytest.approx(stats["ce"])
    for knob in ("kdsp_lambda", "sccm_lambda"):
        with pytest.raises(ValueError, match="needs attributes by label id"):
            build_method("biomedcoop", tiny_backbone, {"biomedcoop": {knob: 0.1}}, INFO)


@pytest.mark.parametrize(("knobs", "message"), [
    ({"tau": 0}, "biomedcoop.tau must be > 0, got 0"),
    ({"kl_reduction": "sum"}, "biomedcoop.kl_reduction must be one of ('batchmean', 'reference'), got 'sum'"),
    ({"prune_z": -1}, "biomedcoop.prune_z must be a number >= 0, got -1"),
    ({"sccm_lambda": -1}, "biomedcoop.sccm_lambda must be a number >= 0, got -1"),
    ({"kdsp_lambda": -1}, "biomedcoop.kdsp_lambda must be a number >= 0, got -1"),
])
def test_biomedcoop_knob_errors(knobs, message, tiny_backbone):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_method("biomedcoop", tiny_backbone, {"biomedcoop": knobs}, INFO, attributes=ATTRS5)


def test_prune_mask_is_the_z_score_with_the_unbiased_std():
    from biovlm.methods.biomedcoop import prune_mask

    # mean 0, unbiased std 2 (the population std, 1.79, would give 3 a z of 1.68 and prune it at 1.5)
    scores = torch.tensor([-2.0, -1.0, -1.0, 1.0, 3.0])
    assert scores.std().item() == pytest.approx(2.0)
    assert prune_mask(scores, 1.5).tolist() == [True] * 5  # |z| = threshold: kept
    assert prune_mask(scores, 1.45).tolist() == [True, True, True, True, False]
    assert prune_mask(scores, 0.9).tolist() == [False, True, True, True, False]
    # two scores are always z = -0.71 and +0.71: a threshold below that would prune both, an empty (NaN) teacher
    assert prune_mask(torch.tensor([1.0, 3.0]), 0.5).tolist() == [True, True]
    assert prune_mask(torch.tensor([1.0, 3.0, 3.2]), 0.8).tolist() == [False, True, True]  # three: pruned normally
    everything = prune_mask(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.1)
    assert everything.dtype == torch.bool and everything.tolist() == [True] * 4  # a mask, not ones to index with
    assert _prune_by_hand([-2.0, -3.0, 0.0, 0.5, 3.5], 1.0) == prune_mask(
        torch.tensor([-2.0, -3.0, 0.0, 0.5, 3.5]), 1.0).nonzero().flatten().tolist()




# ---- CLIP-Adapter --------------------------------------------------------------------------------------------
def test_clip_adapter_mixes_alpha_of_the_adapter_with_one_minus_alpha_of_the_feature(tiny_backbone):
    m = build_method("clip_adapter", tiny_backbone, {"clip_adapter": {"alpha": 0.3, "reduction": 8}}, INFO)
    d = tiny_backbone.embed_dim
    w1, w2 = m.adapter[0].weight, m.adapter[2].weight
    assert w1.shape == (d // 8, d) and w2.shape == (d, d // 8)
    assert m.adapter[0].bias is None and m.adapter[2].bias is None
    with torch.no_grad():
        w2.mul_(5)  # an adapter output of a size unlike the unit feature's
    m.scale = 20 * tiny_backbone.logit_scale
    batch = batch_of(d)
    total, stats = m.loss(batch)
    with torch.no_grad():
        adapted = torch.stack([unit(0.3 * torch.clamp(w2 @ torch.clamp(w1 @ f, min=0), min=0) + 0.7 * f)
                               for f in batch["plain"]])
        assert torch.allclose(m.adapt(batch["plain"]), adapted, atol=1e-6)
        logits = m.scale * adapted @ template_by_hand(tiny_backbone).T
    ce = cross_entropy_by_hand(logits, batch["labels"])
    check_stats(stats, {"ce": ce, "acc": accuracy_by_hand(logits, batch["labels"])}, total, ce)
    assert torch.allclose(m.logits(batch["plain"], NAMES, INFO), logits, atol=1e-4)


def test_clip_adapter_width_init_and_knob_errors(tiny_backbone):
    d = tiny_backbone.embed_dim
    m = build_method("clip_adapter", tiny_backbone, {}, INFO)
    assert m.adapter[0].weight.shape == (d // 4, d)
    assert isinstance(m.adapter[1], nn.ReLU) and isinstance(m.adapter[3], nn.ReLU)
    wide = build_method("clip_adapter", tiny_backbone, {"clip_adapter": {"reduction": 2 * d}}, INFO)
    assert wide.adapter[0].weight.shape == (1, d)
    m.reset_parameters(torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for layer in (m.adapter[0], m.adapter[2]):
        assert torch.allclose(layer.weight.detach(), _uniform(g, layer.weight.shape, 1 / math.sqrt(layer.in_features)),
                              atol=1e-7)
    assert build_method("clip_adapter", tiny_backbone, {"clip_adapter": {"alpha": 1}}, INFO).knobs["alpha"] == 1
    for bad in (0, 1.5, -0.1, True):
        with pytest.raises(ValueError, match=rf"^clip_adapter.alpha must be in \(0, 1\], got {bad!r}$"):
            build_method("clip_adapter", tiny_backbone, {"clip_adapter": {"alpha": bad}}, INFO)
    with pytest.raises(ValueError, match="^clip_adapter.reduction must be a positive integer, got 0$"):
        build_method("clip_adapter", tiny_backbone, {"clip_adapter": {"reduction": 0}}, INFO)


# ---- zero-shot heads -----------------------------------------------------------------------------------------
def test_zeroshot_logits_are_scaled_cosines_to_the_hand_template(tiny_backbone):
    m = build_method("zeroshot", tiny_backbone, {}, INFO)
    f = batch_of(tiny_backbone.embed_dim)["plain"]
    expected = tiny_backbone.logit_scale * f @ template_by_hand(tiny_backbone).T
    assert torch.allclose(m.logits(f, NAMES, INFO), expected, atol=1e-5)
    assert not m.trainable and m.knobs == {}


def test_zeroshot_attr_is_the_unit_mean_of_each_class_attribute_features(tiny_backbone):
    m = build_method("zeroshot_attr", tiny_backbone, {}, INFO, attributes=ATTRS5)
    f = batch_of(tiny_backbone.embed_dim)["plain"]
    head = unit(torch.stack([a.mean(0) for a in attributes_by_hand(tiny_backbone)]))
    expected = tiny_backbone.logit_scale * f @ head.T
    assert torch.allclose(m.logits(f, NAMES, INFO), expected, atol=1e-5)  # its own attributes by default
    other = [["thin wall", "thick wall"] for _ in NAMES]
    head = unit(torch.stack([a.mean(0) for a in attributes_by_hand(tiny_backbone, other)]))
    assert torch.allclose(m.logits(f, NAMES, INFO, other), tiny_backbone.logit_scale * f @ head.T, atol=1e-5)
    assert not m.trainable
    # its own attributes only serve its own class list of its own dataset
    import dataclasses

    twin = dataclasses.replace(INFO, name="twin")
    for names, info in ((NAMES, twin), (NAMES[:4], INFO), (NAMES[::-1], INFO)):
        with pytest.raises(ValueError, match="^method 'zeroshot_attr' needs the attributes of the classes"):
            m.logits(f, names, info)


# ---- linear probe: knobs, fit, logits ------------------------------------------------------------------------
def test_search_grid_is_coops():
    from biovlm.methods.linear_probe import SEARCH_GRID

    assert SEARCH_GRID == (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def test_c_search_moves_towards_the_better_end_and_keeps_it():
    """Accuracy peaks at C = 10^4.6: from the grid's 1e4, each step keeps the better end and the last kept end is
    returned (not the midpoint)."""
    from biovlm.methods.linear_probe import search_c

    chosen, tried = search_c(lambda c: -abs(math.log10(c) - 4.6), steps=2)
    logs = [round(math.log10(c), 6) for c, _ in tried[7:]]
    assert logs == [3.0, 5.0, 4.0, 5.0]  # [3, 5] -> 5 wins, lo = 4; [4, 5] -> 5 wins again
    assert chosen == pytest.approx(10**5.0)
    chosen, tried = search_c(lambda c: -abs(math.log10(c) + 2.2), steps=1)  # peak at 10^-2.2: grid 1e-2
    assert [round(math.log10(c), 6) for c, _ in tried[7:]] == [-3.0, -1.0]
    assert chosen == pytest.approx(10**-3.0)  # -3 is 0.8 away, -1 is 1.2 away
    assert [a for _, a in tried[:7]] == [-abs(e + 2.2) for e in (6, 4, 2, 0, -2, -4, -6)]


@pytest.mark.parametrize(("knobs", "message"), [
    ({"C": 0}, "linear_probe.C must be 'search' (chosen on the validation shots) or a number > 0, got 0"),
    ({"C": True}, "linear_probe.C must be 'search' (chosen on the validation shots) or a number > 0, got True"),
    ({"C": -1.0}, "linear_probe.C must be 'search' (chosen on the validation shots) or a number > 0, got -1.0"),
    ({"max_iter": 0}, "linear_probe.max_iter must be a positive integer, got 0"),
    ({"max_iter": 2.0}, "linear_probe.max_iter must be a positive integer, got 2.0"),
    ({"search_steps": -1}, "linear_probe.search_steps must be a non-negative integer, got -1"),
    ({"search_steps": "8"}, "linear_probe.search_steps must be a non-negative integer, got '8'"),
    ({"tol": -1e-3}, "linear_probe.tol must be > 0, got -0.001"),
])
def test_linear_probe_knob_errors(knobs, message, tiny_backbone):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_method("linear_probe", tiny_backbone, {"linear_probe": knobs}, INFO)


def test_linear_probe_accepts_edge_knobs(tiny_backbone):
    m = build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": 1, "max_iter": 1, "search_steps": 0}},
                     INFO)
    assert m.knobs["C"] == 1 and m.class_specific and not m.trainable


def test_linear_probe_logits_are_sklearns_decision_function_with_its_knobs(tiny_backbone):
    """max_iter and tol reach sklearn: a probe stopped after 3 iterations equals sklearn stopped there."""
    import warnings

    feats = synthetic_features(tiny_backbone.embed_dim, INFO.n_classes, shots=3, noise=0.5)
    knobs = {"C": 50.0, "max_iter": 3, "tol": 1e-3}
    m = build_method("linear_probe", tiny_backbone, {"linear_probe": knobs}, INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn warns that 3 iterations do not converge
        m.setup(feats.pool_clean, feats.pool_labels)
        clf = LogisticRegression(C=50.0, max_iter=3, tol=1e-3).fit(feats.pool_clean.double().numpy(),
                                                                     feats.pool_labels.numpy())
        full = LogisticRegression(C=50.0, max_iter=1000, tol=1e-3).fit(feats.pool_clean.double().numpy(),
                                                                        feats.pool_labels.numpy())
    x = feats.test_features
    expected = clf.decision_function(x.double().numpy())
    assert not np.allclose(expected, full.decision_function(x.double().numpy()), atol=1e-3)
    np.testing.assert_allclose(m.logits(x, NAMES, INFO).numpy(), expected, atol=1e-4)
    assert m.checkpoint()["meta"]["C"] == 50.0 and m.chosen_c == 50.0


def test_linear_probe_setup_and_transfer_errors(tiny_backbone):
    feats = synthetic_features(tiny_backbone.embed_dim, INFO.n_classes, shots=2)
    m = build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": 1.0}}, INFO)
    with pytest.raises(RuntimeError, match="^linear probe has not been fitted: run biovlm.train.fit first$"):
        m.logits(feats.test_features, NAMES, INFO)
    labels = feats.pool_labels.clone()
    labels[labels == 3] = 4
    with pytest.raises(ValueError, match=re.escape("linear probe needs shots of every training class 0..7, got "
                                                   "[0, 1, 2, 4, 5, 6, 7]")):
        m.setup(feats.pool_clean, labels)
    one = build_method("linear_probe", tiny_backbone, {"linear_probe": {"C": 1.0}}, INFO, class_ids=[2])
    with pytest.raises(ValueError, match="^linear probe needs at least two classes$"):
        one.setup(feats.pool_clean[:2], torch.zeros(2, dtype=torch.long))
    m.setup(feats.pool_clean, feats.pool_labels)
    assert bool(m.fitted)
    other = get_dataset("pathmnist")
    with pytest.raises(NotTransferable, match=re.escape(
            f"linear_probe was trained on bloodmnist classes {NAMES} and cannot classify unseen classes "
            f"{[NAMES[0]]} of pathmnist")):
        m.logits(feats.test_features, [NAMES[0]], other)


# ---- BioVLM: prediction routes the bank, the reference KL scaling, knob messages -----------------------------
def test_biovlm_logits_route_the_bank_by_select_ratio(tiny_backbone):
    m = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 5, "select_ratio": 0.4}}, INFO,
                     attributes=ATTRS)
    with torch.no_grad():
        m.ctx.mul_(50)
    f = fixed_batch(tiny_backbone.embed_dim, INFO.n_classes)["plain"]
    text = m.prompt_features(NAMES).detach()
    expected = []
    for x in f:
        members = [(m.scale * text[j] @ x).tolist() for j in range(5)]
        expected.append(torch.tensor(members)[_keep(members, 0.4)].mean(0))
    assert torch.allclose(m.logits(f, NAMES, INFO), torch.stack(expected), atol=1e-5)


def test_biovlm_reference_kl_divides_by_bank_size_and_classes(tiny_backbone):
    knobs = {"bank_size": 3, "l_ent": 0.0, "l_cos": 0.0}
    batch = fixed_batch(tiny_backbone.embed_dim, INFO.n_classes)
    mean = build_method("biovlm", tiny_backbone, {"biovlm": {**knobs, "kl_reduction": "batchmean"}}, INFO,
                        attributes=ATTRS)
    ref = build_method("biovlm", tiny_backbone, {"biovlm": {**knobs, "kl_reduction": "reference"}}, INFO,
                       attributes=ATTRS)
    for m in (mean, ref):
        m.scale = 20 * tiny_backbone.logit_scale
    a, _ = mean.loss_terms(batch)
    b, _ = ref.loss_terms(batch)
    for term in ("kd", "aug"):
        assert a[term].item() > 1e-4
        assert b[term].item() == pytest.approx(a[term].item() / (3 * INFO.n_classes), rel=1e-5)


@pytest.mark.parametrize(("knobs", "message"), [
    ({"tau": 0}, "biovlm.tau must be > 0, got 0"),
    ({"kl_reduction": "mean"}, "biovlm.kl_reduction must be one of ('batchmean', 'reference'), got 'mean'"),
    ({"n_ctx": 0}, "biovlm.n_ctx must be a positive integer, got 0"),
    ({"l_ent": -1}, "biovlm.l_ent must be a number >= 0, got -1"),
    ({"l_aug": -1}, "biovlm.l_aug must be a number >= 0, got -1"),
    ({"l_cos": -1}, "biovlm.l_cos must be a number >= 0, got -1"),
])
def test_biovlm_knob_errors(knobs, message, tiny_backbone):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_method("biovlm", tiny_backbone, {"biovlm": knobs}, INFO, attributes=ATTRS)


@pytest.mark.parametrize("on", ["l_kd", "l_aug", "l_cos"])
def test_biovlm_needs_attributes_for_any_attribute_term(on, tiny_backbone):
    knobs = {"l_kd": 0, "l_aug": 0, "l_cos": 0, on: 0.1}
    with pytest.raises(ValueError, match="needs attributes by label id"):
        build_method("biovlm", tiny_backbone, {"biovlm": knobs}, INFO)


@pytest.mark.parametrize(("on", "term"), [("l_kd", "kd"), ("l_aug", "aug"), ("l_cos", "cos")])
def test_biovlm_each_attribute_term_works_alone(on, term, tiny_backbone):
    knobs = {"bank_size": 2, "l_ent": 0, "l_kd": 0, "l_aug": 0, "l_cos": 0, on: 0.5}
    m = build_method("biovlm", tiny_backbone, {"biovlm": knobs}, INFO, attributes=ATTRS)
    terms, _ = m.loss_terms(fixed_batch(tiny_backbone.embed_dim, INFO.n_classes))
    assert set(terms) == {"ce", term}


@pytest.mark.parametrize(("off", "teacher_views"), [("l_kd", [2]), ("l_aug", [1])])
def test_biovlm_a_zero_weight_teacher_is_not_computed(off, teacher_views, tiny_backbone, monkeypatch):
    """As the module says, a weight of 0 removes its term and it is not computed: the unused teacher is never built."""
    m = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 2, off: 0}}, INFO, attributes=ATTRS)
    calls = []
    real = m.teacher_logits
    monkeypatch.setattr(m, "teacher_logits", lambda views, c: calls.append(len(views)) or real(views, c))
    m.loss_terms(fixed_batch(tiny_backbone.embed_dim, INFO.n_classes))
    assert calls == teacher_views


def test_linear_probe_starts_unfitted_and_says_how_to_run_without_validation_shots(tiny_backbone):
    """A fresh probe holds a boolean `fitted` flag (saved in checkpoints) and no chosen C; C: search without
    validation shots names the fix in full."""
    m = build_method("linear_probe", tiny_backbone, {}, INFO)
    assert m.fitted.dtype == torch.bool and not bool(m.fitted) and m.chosen_c is None
    assert m.state_dict()["fitted"].dtype == torch.bool
    feats = synthetic_features(tiny_backbone.embed_dim, INFO.n_classes, shots=2)
    message = ("linear_probe.C: search chooses C on validation shots, and this run has none; give linear_probe.C "
               "a number")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        m.setup(feats.pool_clean, feats.pool_labels, None)
