"""The shared method machinery (biovlm.methods.base and the registry): knob checks and their messages, class lists,
constant texts, attribute classifiers, logits in float32, checkpoints, learned-context initialisation."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from biovlm import prompts
from biovlm.data import DatasetInfo, get_dataset
from biovlm.methods import METHOD_NAMES, build_method, check_method_name
from biovlm.methods.base import (
    CHECKPOINT_VERSION,
    Method,
    accuracy,
    check_non_negative,
    check_positive_int,
    check_ratio,
    context_init,
    cosine_logits,
    merge_knobs,
)

INFO = get_dataset("bloodmnist")  # 8 classes
NAMES = list(INFO.prompt_names)
ATTRS = [[f"{w} granules", f"{w} nucleus"] for w in ("round", "lobed", "pale", "dark", "small", "large", "smooth",
                                                         "rough")]


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# ---- knobs ---------------------------------------------------------------------------------------------------
def test_merge_knobs_overlays_and_names_unknown_ones():
    assert merge_knobs("m", {"a": 1, "b": 2}, {"b": 5}) == {"a": 1, "b": 5}
    assert merge_knobs("m", {"a": 1}, None) == {"a": 1}
    with pytest.raises(ValueError, match=exactly("unknown knob(s) ['c', 'd'] for method 'm'; valid knobs: ['a', 'b']")):
        merge_knobs("m", {"b": 2, "a": 1}, {"d": 0, "c": 0, "a": 3})


@pytest.mark.parametrize(("check", "good", "bad", "message"), [
    (check_positive_int, [1, 7], [0, -1, 1.0, True, "2"], "m.k must be a positive integer, got {!r}"),
    (check_non_negative, [0, 0.0, 2, 0.5], [-1, -0.1, float("nan"), True, "1"], "m.k must be a number >= 0, got {!r}"),
    (check_ratio, [1, 1.0, 0.01], [0, 0.0, 1.01, -0.5, True, "0.5"], "m.k must be in (0, 1], got {!r}"),
])
def test_knob_checks_accept_and_refuse_with_the_value_in_the_message(check, good, bad, message):
    for v in good:
        check("m", {"j": 1, "k": v}, "j", "k")
    for v in bad:
        with pytest.raises(ValueError, match=exactly(message.format(v))):
            check("m", {"j": 1, "k": v}, "j", "k")


def test_every_method_name_is_registered_and_checked():
    from biovlm.methods import METHODS

    assert tuple(METHODS) == METHOD_NAMES
    assert all(cls.name == name for name, cls in METHODS.items())
    check_method_name("coop")
    with pytest.raises(ValueError, match=exactly(f"unknown method 'cop'; valid methods: {', '.join(METHOD_NAMES)}")):
        check_method_name("cop")
    import biovlm.methods as methods

    assert methods.Method is Method and methods.PromptMethod.__name__ == "PromptMethod"
    with pytest.raises(AttributeError, match=exactly("module 'biovlm.methods' has no attribute 'Nope'")):
        methods.Nope  # noqa: B018


def test_build_method_takes_its_knobs_from_the_config_and_all_classes_by_default(tiny_backbone):
    m = build_method("kgcoop", tiny_backbone, {"kgcoop": {"weight": 2.5}, "coop": {"n_ctx": 9}}, INFO)
    assert m.knobs == {"n_ctx": 4, "ctx_init": "", "weight": 2.5}
    assert m.class_ids == list(range(8)) and m.class_names == NAMES
    assert build_method("kgcoop", tiny_backbone, None, INFO).knobs["weight"] == 1.0
    assert build_method("kgcoop", tiny_backbone, {"kgcoop": None}, INFO).knobs["weight"] == 1.0
    # a params.yaml section's schedule and per-run values are not knobs of the method
    section = {"weight": 2.0, "train": {"epochs": 3}, "per_run": {"fewshot": {"all": {"weight": 5.0}}}}
    assert build_method("kgcoop", tiny_backbone, {"kgcoop": section}, INFO).knobs == {"n_ctx": 4, "ctx_init": "",
                                                                                      "weight": 2.0}
    m = build_method("coop", tiny_backbone, {}, INFO, class_ids=(5, 2))
    assert m.class_ids == [5, 2] and m.class_names == [NAMES[5], NAMES[2]]
    with pytest.raises(TypeError, match=exactly("attributes must be a list of attribute lists (one per class id); "
                                                "pass class_ids by keyword")):
        build_method("coop", tiny_backbone, {}, INFO, ["a"] * 8)


def test_default_knobs_of_every_method(tiny_backbone):
    """The defaults are part of what a run reports when params.yaml leaves a knob out."""
    defaults = {name: build_method(name, tiny_backbone, {}, INFO, attributes=ATTRS).knobs for name in METHOD_NAMES}
    assert defaults == {
        "zeroshot": {}, "zeroshot_attr": {},
        "coop": {"n_ctx": 4, "ctx_init": ""},
        "cocoop": {"n_ctx": 4, "ctx_init": "", "meta_reduction": 16},
        "kgcoop": {"n_ctx": 4, "ctx_init": "", "weight": 1.0},
        "biomedcoop": {"n_ctx": 4, "ctx_init": "", "sccm_lambda": 1.0, "kdsp_lambda": 1.0, "prune_z": 1.5,
                       "tau": 1.0, "kl_reduction": "reference"},
        "clip_adapter": {"alpha": 0.5, "reduction": 4},
        "linear_probe": {"C": "search", "search_steps": 8, "max_iter": 1000, "tol": 1e-4},
        "biovlm": {"bank_size": 10, "n_ctx": 4, "ctx_init": "", "select_ratio": 0.5, "teacher_ratio": 0.5,
                   "tau": 1.0, "l_ent": 0.5, "l_kd": 1.0, "l_aug": 1.0, "l_cos": 0.5, "kl_reduction": "reference"},
    }


# ---- class lists and attributes ------------------------------------------------------------------------------
@pytest.mark.parametrize(("ids", "message"), [
    ([], "class_ids must be a non-empty list of distinct label ids, got []"),
    ([1, 2, 1], "class_ids must be a non-empty list of distinct label ids, got [1, 2, 1]"),
    ([0, 8], "class_ids [0, 8] out of range for bloodmnist (8 classes)"),
    ([-1, 3], "class_ids [-1, 3] out of range for bloodmnist (8 classes)"),
])
def test_class_id_errors(ids, message, tiny_backbone):
    with pytest.raises(ValueError, match=exactly(message)):
        build_method("coop", tiny_backbone, {}, INFO, class_ids=ids)


def test_attributes_are_kept_by_class_id_and_must_cover_the_dataset(tiny_backbone):
    m = build_method("zeroshot_attr", tiny_backbone, {}, INFO, attributes=ATTRS, class_ids=[6, 1])
    assert m.attributes == [ATTRS[6], ATTRS[1]]
    assert build_method("zeroshot", tiny_backbone, {}, INFO).attributes is None
    with pytest.raises(ValueError, match=exactly("attributes must hold one list per class of bloodmnist (8), "
                                                 "got 7 lists")):
        build_method("zeroshot_attr", tiny_backbone, {}, INFO, attributes=ATTRS[:7])
    with pytest.raises(ValueError, match=exactly(
            "method 'biovlm' with these knobs needs attributes by label id (pass "
            "attributes=biovlm.filtering.load_table(path).select(shots, classes, keep))")):
        build_method("biovlm", tiny_backbone, {}, INFO)


def test_attribute_classifiers_use_the_shortest_list_and_the_mean_uses_every_attribute(tiny_backbone):
    m = build_method("zeroshot", tiny_backbone, {}, INFO)
    names, attrs = NAMES[:3], [["a1", "a2", "a3"], ["b1", "b2"], ["c1", "c2", "c3", "c4"]]
    classifiers, mean = m.attribute_features(names, INFO, attrs)
    feats = [F.normalize(tiny_backbone.encode_texts([prompts.attribute_text(INFO, n, a) for a in al]).float(), dim=-1)
             for n, al in zip(names, attrs, strict=True)]
    assert classifiers.shape == (2, 3, tiny_backbone.embed_dim)
    for j in range(2):
        assert torch.allclose(classifiers[j], torch.stack([f[j] for f in feats]), atol=1e-6)
    expected = torch.stack([f.mean(0) / f.mean(0).norm() for f in feats])
    assert torch.allclose(mean, expected, atol=1e-6)
    with pytest.raises(ValueError, match=exactly("method 'zeroshot' needs the attributes of the classes "
                                                 f"{names!r}")):
        m.attribute_features(names, INFO, None)
    with pytest.raises(ValueError, match=exactly("got 2 attribute lists for 3 classes")):
        m.attribute_features(names, INFO, attrs[:2])
    with pytest.raises(ValueError, match=exactly(f"classes without any attribute: [{names[1]!r}]")):
        m.attribute_features(names, INFO, [["a"], [], ["c"]])
    one_each, _ = m.attribute_features(names, INFO, [["a"], ["b"], ["c"]])  # one attribute per class is enough
    assert one_each.shape == (1, 3, tiny_backbone.embed_dim)


def test_constant_texts_are_unit_vectors_whatever_the_tower_returns(tiny_backbone, monkeypatch):
    m = build_method("zeroshot", tiny_backbone, {}, INFO)
    real = tiny_backbone.encode_texts
    monkeypatch.setattr(tiny_backbone, "encode_texts", lambda texts: 3 * real(texts).double())
    feats = m.template_features(NAMES[:3], INFO)
    assert feats.dtype == torch.float32
    assert torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-6)
    assert torch.allclose(feats, real([prompts.template_text(INFO, n) for n in NAMES[:3]]).float(), atol=1e-6)


def test_learned_prompt_features_are_unit_vectors_whatever_the_tower_returns(tiny_backbone, monkeypatch):
    m = build_method("coop", tiny_backbone, {}, INFO)
    real = tiny_backbone.encode_text_embeddings
    monkeypatch.setattr(tiny_backbone, "encode_text_embeddings", lambda e, mask: 3 * real(e, mask).double())
    feats = m.prompt_features(NAMES[:3])
    assert feats.dtype == torch.float32 and feats.shape == (1, 3, tiny_backbone.embed_dim)
    assert torch.allclose(feats.norm(dim=-1), torch.ones(1, 3), atol=1e-6)


# ---- logits --------------------------------------------------------------------------------------------------
def test_cosine_logits_and_accuracy():
    f = torch.tensor([[1.0, 0.0], [0.6, 0.8]], dtype=torch.bfloat16)
    t = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]])
    out = cosine_logits(10.0, f, t)
    assert out.dtype == torch.float32
    expected = 10.0 * f.float() @ t.T
    assert torch.equal(out, expected)
    assert accuracy(out, torch.tensor([2, 2])) == 0.5
    assert accuracy(out, torch.tensor([1, 2])) == 1.0 and accuracy(out, torch.tensor([0, 0])) == 0.0


def test_the_logit_scale_is_the_towers(tiny_backbone):
    m = build_method("coop", tiny_backbone, {}, INFO)
    assert m.scale == tiny_backbone.logit_scale and isinstance(m.scale, float)
    f = F.normalize(torch.randn(3, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
    text = m.prompt_features(NAMES)[0].detach()
    assert torch.allclose(m.logits(f, NAMES, INFO), tiny_backbone.logit_scale * f @ text.T, atol=1e-5)
    assert m.device == tiny_backbone.device


def test_the_interface_methods_must_be_implemented(tiny_backbone):
    base = Method(tiny_backbone, None, INFO, [0, 1])
    assert base.name == "" and base.trainable and not base.needs_attributes and not base.class_specific
    with pytest.raises(NotImplementedError):
        base.text_head(NAMES, INFO)
    with pytest.raises(NotImplementedError):
        base.head_logits(None, torch.zeros(1, 2))
    zs = build_method("zeroshot", tiny_backbone, {}, INFO)
    with pytest.raises(NotImplementedError, match=exactly("method 'zeroshot' is not trained by gradient descent")):
        zs.loss({})


# ---- checkpoints ---------------------------------------------------------------------------------------------
def test_checkpoint_meta_and_its_errors(tiny_backbone):
    m = build_method("zeroshot_attr", tiny_backbone, {}, INFO, attributes=ATTRS, class_ids=[3, 0])
    state = m.checkpoint()
    assert CHECKPOINT_VERSION == 2
    assert state["meta"] == {"method": "zeroshot_attr", "version": 2, "knobs": {}, "backbone": "tiny",
                             "dataset": "bloodmnist", "class_ids": [3, 0], "class_names": [NAMES[3], NAMES[0]],
                             "attributes": [ATTRS[3], ATTRS[0]], "info": INFO.to_meta()}
    assert DatasetInfo.from_meta(json.loads(json.dumps(state["meta"]["info"]))) == INFO  # JSON round trip
    coop = build_method("coop", tiny_backbone, {}, INFO)
    state = coop.checkpoint()
    assert set(state["tensors"]) == {"ctx"} and not state["tensors"]["ctx"].requires_grad
    other = build_method("coop", tiny_backbone, {}, INFO)
    with torch.no_grad():
        other.ctx.zero_()
    other.load_checkpoint({"meta": {**state["meta"], "backbone": None}, "tensors": state["tensors"]})
    assert torch.equal(other.ctx, coop.ctx)
    with pytest.raises(ValueError, match=exactly("checkpoint was trained with backbone 'clip', but this method uses "
                                                 "'tiny'")):
        other.load_checkpoint({"meta": {**state["meta"], "backbone": "clip"}, "tensors": state["tensors"]})
    with pytest.raises(ValueError, match=exactly("checkpoint is for method None, not 'coop'")):
        other.load_checkpoint({"tensors": state["tensors"]})
    six = build_method("coop", tiny_backbone, {"coop": {"n_ctx": 6}}, INFO)
    with pytest.raises(ValueError, match=re.escape(
            "checkpoint tensors do not fit this coop (built with knobs {'n_ctx': 6, 'ctx_init': ''}; "
            "checkpoint knobs {'n_ctx': 4, 'ctx_init': ''}): ")):
        six.load_checkpoint(state)


# ---- learned contexts ----------------------------------------------------------------------------------------
def test_context_init_is_small_gaussian_noise_drawn_from_the_generator(tiny_backbone):
    ctx = context_init(tiny_backbone, 3, None, 2, torch.Generator().manual_seed(4))
    expected = torch.randn(2, 3, tiny_backbone.text_width, generator=torch.Generator().manual_seed(4)) * 0.02
    assert torch.equal(ctx, expected)
    assert torch.equal(context_init(tiny_backbone, 3, "", 2, torch.Generator().manual_seed(4)), expected)


def test_a_phrase_starts_the_first_context_and_noise_the_others(tiny_backbone):
    ids, _ = tiny_backbone.tokenize(["a cell"])
    n = int(_[0].sum()) - 2
    ctx = context_init(tiny_backbone, n, "a cell", 3, torch.Generator().manual_seed(1))
    words = tiny_backbone.token_embeddings(ids)[0, 1:1 + n].float()
    noise = torch.randn(3, n, tiny_backbone.text_width, generator=torch.Generator().manual_seed(1)) * 0.02
    assert torch.equal(ctx[0], words)
    assert torch.allclose(ctx[1:], words + noise[1:])


def test_prompt_methods_start_from_seed_zero_and_reset_from_the_generator(tiny_backbone):
    m = build_method("coop", tiny_backbone, {"coop": {"n_ctx": 2}}, INFO)
    expected = torch.randn(1, 2, tiny_backbone.text_width, generator=torch.Generator().manual_seed(0)) * 0.02
    assert torch.equal(m.ctx.detach(), expected)
    m.reset_parameters(torch.Generator().manual_seed(9))
    again = torch.randn(1, 2, tiny_backbone.text_width, generator=torch.Generator().manual_seed(9)) * 0.02
    assert torch.equal(m.ctx.detach(), again)
    bank = build_method("biovlm", tiny_backbone, {"biovlm": {"bank_size": 3}}, INFO, attributes=ATTRS)
    assert bank.ctx.shape == (3, 4, tiny_backbone.text_width)
    with pytest.raises(ValueError, match=exactly("coop.n_ctx must be a positive integer, got 0")):
        build_method("coop", tiny_backbone, {"coop": {"n_ctx": 0}}, INFO)


class _OddTokenizer:
    """Wraps the tiny tower but splits the placeholder into two tokens, as some tokenizers would."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.name = "odd"

    def tokenize(self, texts):
        ids, mask = self.backbone.tokenize(texts)
        if texts == [prompts.PLACEHOLDER]:
            return ids, mask
        return ids + 1, mask  # no placeholder token at positions 1..n_ctx


def test_a_tokenizer_that_splits_the_placeholder_is_refused(tiny_backbone):
    from biovlm.methods.base import PromptTokens

    tokens = PromptTokens(_OddTokenizer(tiny_backbone), 4)
    with pytest.raises(RuntimeError, match=exactly(
            "the tokenizer of odd does not map each 'X' of the prompt prefix to one token at positions 1..4")):
        tokens.embed(NAMES[:2])
    short = PromptTokens(tiny_backbone, 40)  # the prompt's ids are shorter than 2 + n_ctx once cut
    short.backbone = type("B", (), {"tokenize": lambda self, t: tuple(x[:, :5] for x in tiny_backbone.tokenize(t))})()
    with pytest.raises(RuntimeError, match="of \\? does not map each 'X'"):
        short.embed(NAMES[:2])


def test_prompt_parts_keep_start_context_and_name_in_place(tiny_backbone):
    """encode() overwrites exactly positions 1..n_ctx: all-zero contexts give the same prompt as zero embeddings
    written at those positions of the tokenized text."""
    m = build_method("coop", tiny_backbone, {"coop": {"n_ctx": 2}}, INFO)
    emb, mask = m.tokens.embed(NAMES[:3])
    ctx = torch.randn(2, 2, tiny_backbone.text_width, generator=torch.Generator().manual_seed(2))
    feats = m.tokens.encode(ctx, NAMES[:3])
    for g in range(2):
        x = emb.clone()
        x[:, 1:3] = ctx[g]
        direct = F.normalize(tiny_backbone.encode_text_embeddings(x, mask).float(), dim=-1)
        assert torch.allclose(feats[g], direct, atol=1e-5)
    assert math.isclose(float(feats.norm(dim=-1).mean()), 1.0, rel_tol=1e-5)


class _MetaBackbone:
    """The attributes a method reads from its backbone at construction, on PyTorch's 'meta' device."""

    name, embed_dim, text_width, logit_scale = "meta-tower", 16, 12, 10.0
    device = torch.device("meta")


@pytest.mark.parametrize("name", METHOD_NAMES)
def test_every_tensor_is_created_on_the_backbones_device_and_attributes_are_kept(name):
    """Constructors place their tensors on ``backbone.device`` themselves (not only ``build_method``'s final move),
    and every method keeps the attributes of its classes for its checkpoint, whether it uses them or not."""
    from biovlm.methods import METHODS

    m = METHODS[name](_MetaBackbone(), {}, INFO, [4, 1], ATTRS)
    tensors = list(m.parameters()) + list(m.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    assert m.attributes == [ATTRS[4], ATTRS[1]] and m.knobs == type(m).DEFAULTS
