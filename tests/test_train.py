"""The training loop: determinism, schedule, logging, NaN stop, and learning on synthetic twins."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import COMMITTED_PARAMS
from torch import nn

from biovlm.data import get_dataset
from biovlm.methods import build_method
from biovlm.methods.base import Method
from biovlm.train import TRAIN_DEFAULTS, NonFiniteLossError, dvclive_logger, fit, lr_at, predict, train_knobs

INFO = get_dataset("bloodmnist")
ATTRS = [[f"{w} granules", f"{w} nucleus"] for w in
         ("round", "lobed", "pale", "dark", "small", "large", "smooth", "rough")]


def features_for(d: int, n_classes: int = 8, shots: int = 4, views: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    proto = F.normalize(torch.randn(n_classes, d, generator=g), dim=-1)

    def draw(labels, *extra):
        x = proto[labels].view(len(labels), *([1] * len(extra)), d)
        return F.normalize(x + 0.2 * torch.randn(len(labels), *extra, d, generator=g), dim=-1)

    pool = torch.arange(n_classes).repeat_interleave(shots)
    val = torch.arange(n_classes).repeat(2)
    return SimpleNamespace(pool_labels=pool, pool_clean=draw(pool),
                           pool_views={k: draw(pool, views) for k in ("plain", "weak", "strong")},
                           val_features=draw(val), val_labels=val)


CFG = {"train": {"epochs": 3, "batch_size": 8, "lr": 0.05}, "biovlm": {"bank_size": 3}}


def test_same_seed_same_tensors_bit_for_bit(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    runs = []
    for seed in (7, 7, 8):
        m = build_method("biovlm", tiny_backbone, CFG, INFO, attributes=ATTRS)
        history = fit(m, feats, range(len(feats.pool_labels)), CFG, seed=seed)
        runs.append((m.ctx.detach().clone(), [r["loss"] for r in history["epochs"]]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    assert not torch.equal(runs[0][0], runs[2][0])


@pytest.fixture(scope="module")
def tiny_clip():
    """Random like ``tiny``, but its text tower does not map every text to nearly one vector as random BERT does,
    so prompts can learn and bank members differ."""
    from biovlm.backbone import load_backbone

    return load_backbone("tiny-clip")


def test_training_lowers_the_loss_and_logs_every_term(tiny_clip):
    backbone = tiny_clip
    feats = features_for(backbone.embed_dim)
    cfg = {"train": {"epochs": 6, "batch_size": 8, "lr": 0.05}, "biovlm": {"bank_size": 3}}
    m = build_method("biovlm", backbone, cfg, INFO, attributes=ATTRS)
    logged = []
    history = fit(m, feats, range(len(feats.pool_labels)), cfg, seed=0, log=lambda r, e: logged.append((e, r)))
    losses = [r["loss"] for r in history["epochs"]]
    assert losses[-1] < losses[0]
    assert [e for e, _ in logged] == list(range(6))
    assert {"loss", "ce", "ent", "kd", "aug", "cos", "acc", "val_acc", "lr"} <= set(logged[0][1])
    assert history["steps"] == 6 * 4  # 32 images, batches of 8


def test_lr_schedule_is_constant_warmup_then_cosine():
    k = train_knobs({"train": {"epochs": 5, "lr": 0.1, "warmup_epochs": 1, "warmup_lr": 1e-5}})
    lrs = [lr_at(e, k) for e in range(5)]
    assert lrs[0] == 1e-5
    assert lrs[1] == pytest.approx(0.1)
    assert lrs[2] == pytest.approx(0.05 * (1 + math.cos(math.pi / 4)))
    assert lrs[1] > lrs[2] > lrs[3] > lrs[4] > 0
    assert lr_at(0, train_knobs({"train": {"warmup_epochs": 0}})) == pytest.approx(0.002)


def test_train_knobs_are_validated():
    with pytest.raises(ValueError, match=r"unknown train knob\(s\) \['epoch'\]"):
        train_knobs({"train": {"epoch": 3}})
    with pytest.raises(ValueError, match="train.batch_size must be a positive integer"):
        train_knobs({"train": {"batch_size": 0}})
    with pytest.raises(ValueError, match="train.lr must be a number >= 0"):
        train_knobs({"train": {"lr": -1}})
    with pytest.raises(ValueError, match="train.val_every must be a positive integer, got 0"):
        train_knobs({"train": {"val_every": 0}})
    assert train_knobs(None)["epochs"] == 50


def test_validation_runs_every_val_every_epochs_and_after_the_last(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    cfg = {"train": {"epochs": 7, "batch_size": 32, "lr": 0.05, "val_every": 3}}
    history = fit(build_method("coop", tiny_backbone, cfg, INFO), feats, range(len(feats.pool_labels)), cfg, seed=0)
    assert [r["epoch"] for r in history["epochs"] if "val_acc" in r] == [2, 5, 6]


class _Exploding(Method):
    """Loss whose 'boom' term turns into NaN at the fourth step."""

    name = "exploding"

    def __init__(self, backbone, info):
        super().__init__(backbone, {}, info, range(info.n_classes))
        self.w = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.calls = 0

    def loss(self, batch):
        self.calls += 1
        boom = (batch["plain"] @ self.w).mean() + (float("nan") if self.calls == 4 else 0.0)
        return boom, {"loss": boom.item(), "ce": 0.0, "boom": boom.item(), "acc": 0.0}


class _Recorder(Method):
    """Records which view of each pool image every batch holds (the views carry their index in coordinate 0)."""

    name = "recorder"

    def __init__(self, backbone, info):
        super().__init__(backbone, {}, info, range(info.n_classes))
        self.w = nn.Parameter(torch.zeros(backbone.embed_dim))
        self.seen: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def loss(self, batch):
        self.seen.append(tuple(batch[k][:, 0].clone() for k in ("plain", "weak", "strong")))
        loss = (batch["plain"] @ self.w).mean()
        return loss, {"loss": loss.item(), "acc": 0.0}


def test_training_draws_one_view_tuple_per_image(tiny_backbone):
    """weak and strong view v are augmentations of plain view v's crop: a batch pairs them, never mixes tuples."""
    feats = features_for(tiny_backbone.embed_dim, views=5)
    feats.val_labels = None  # no validation pass
    for k, offset in (("plain", 0.0), ("weak", 100.0), ("strong", 200.0)):
        feats.pool_views[k][:, :, 0] = torch.arange(5, dtype=torch.float32) + offset
    m = _Recorder(tiny_backbone, INFO)
    fit(m, feats, range(len(feats.pool_labels)), {"train": {"epochs": 4, "batch_size": 8}}, seed=3)
    plain, weak, strong = (torch.cat(parts) for parts in zip(*m.seen, strict=True))
    assert torch.equal(weak - 100, plain) and torch.equal(strong - 200, plain)
    assert len(set(plain.tolist())) == 5  # every view index drawn


def test_every_image_sees_a_new_view_each_epoch_until_all_are_used(tiny_backbone):
    """The public code augments afresh at every step: with V views and E <= V epochs, no image repeats a view; with
    more epochs, each image uses all V before any repeats (epoch e: the (e mod V)-th of its own permutation)."""
    n_views, epochs = 5, 7
    feats = features_for(tiny_backbone.embed_dim, views=n_views)
    feats.val_labels = None
    n = len(feats.pool_labels)
    for k in ("plain", "weak", "strong"):
        feats.pool_views[k][:, :, 0] = torch.arange(n, dtype=torch.float32)[:, None]  # the image
        feats.pool_views[k][:, :, 1] = torch.arange(n_views, dtype=torch.float32)  # the view
    m = _BatchKeys(tiny_backbone, INFO)
    m.loss = lambda batch: m.seen.append((batch["plain"][:, 0].clone(), batch["plain"][:, 1].clone())) or (
        (batch["plain"] @ m.w).mean(), {"loss": 0.0, "acc": 0.0})
    fit(m, feats, range(n), {"train": {"epochs": epochs, "batch_size": 8}}, seed=1)
    per_epoch = -(-n // 8)
    assert len(m.seen) == epochs * per_epoch
    seen: dict[int, list[int]] = {i: [] for i in range(n)}
    for image, view in m.seen:
        for i, v in zip(image.long().tolist(), view.long().tolist(), strict=True):
            seen[i].append(v)
    for views in seen.values():
        assert sorted(views[:n_views]) == list(range(n_views))  # the first 5 epochs: 5 different views
        assert views[n_views:] == views[: epochs - n_views]  # then the same order again
    assert len({tuple(v) for v in seen.values()}) > 1  # each image has its own order


class _BatchKeys(_Recorder):
    """Records the keys of every batch and, per row, the image index carried by its clean and plain features."""

    def loss(self, batch):
        self.seen.append((sorted(batch), batch["clean"][:, 0].clone(), batch["plain"][:, 1].clone(),
                          batch["labels"].clone()))
        loss = (batch["plain"] @ self.w).mean()
        return loss, {"loss": loss.item(), "acc": 0.0}


def test_a_batch_holds_the_clean_features_and_labels_of_its_own_images(tiny_backbone):
    """Method.loss gets {"plain", "weak", "strong", "clean", "labels"} (docs/training.md), rows of the same images."""
    feats = features_for(tiny_backbone.embed_dim, views=3)
    feats.val_labels = None
    n = len(feats.pool_labels)
    feats.pool_clean[:, 0] = torch.arange(n, dtype=torch.float32)
    for k in ("plain", "weak", "strong"):
        feats.pool_views[k][:, :, 1] = torch.arange(n, dtype=torch.float32)[:, None]
    m = _BatchKeys(tiny_backbone, INFO)
    fit(m, feats, range(n), {"train": {"epochs": 2, "batch_size": 8}}, seed=1)
    for keys, clean, plain, labels in m.seen:
        assert keys == ["clean", "labels", "plain", "strong", "weak"]
        assert torch.equal(clean, plain)
        assert torch.equal(labels, feats.pool_labels[clean.long()])


def test_nan_loss_stops_with_the_term_and_step(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    m = _Exploding(tiny_backbone, INFO)
    with pytest.raises(NonFiniteLossError, match=r"'boom' became nan at epoch 0, step 3"):
        fit(m, feats, range(len(feats.pool_labels)), {"train": {"batch_size": 8}}, seed=0)


def test_untrained_methods_skip_the_loop(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    m = build_method("zeroshot", tiny_backbone, {}, INFO)
    assert fit(m, feats, range(len(feats.pool_labels)), CFG, seed=0)["epochs"] == []


def test_positions_outside_the_method_classes_are_refused(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    m = build_method("coop", tiny_backbone, CFG, INFO, class_ids=[0, 1])
    with pytest.raises(ValueError, match=r"training labels \[2\] are not among the method's classes \[0, 1\]"):
        fit(m, feats, range(12), CFG, seed=0)


def test_dvclive_logger_writes_every_number_then_steps():
    calls = []
    live = SimpleNamespace(log_metric=lambda k, v: calls.append((k, v)), next_step=lambda: calls.append("step"))
    log = dvclive_logger(live, prefix="coop/s1/")
    log({"epoch": 0, "loss": 1.5, "acc": 0.25, "note": "x"}, 0)
    assert calls == [("coop/s1/loss", 1.5), ("coop/s1/acc", 0.25), "step"]


def test_dvclive_logger_with_a_real_live(tmp_path, tiny_backbone):
    from dvclive import Live

    feats = features_for(tiny_backbone.embed_dim)
    m = build_method("coop", tiny_backbone, CFG, INFO)
    with Live(str(tmp_path / "live"), save_dvc_exp=False, dvcyaml=None) as live:
        fit(m, feats, range(len(feats.pool_labels)), CFG, seed=0, log=dvclive_logger(live))
    tsv = (tmp_path / "live" / "plots" / "metrics" / "ce.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["step", "ce"] and len(tsv) == 1 + 3


def test_predict_is_batch_size_invariant_and_matches_logits(tiny_clip):
    feats = features_for(tiny_clip.embed_dim)
    m = build_method("biovlm", tiny_clip, CFG, INFO, attributes=ATTRS)
    with torch.no_grad():
        m.ctx.mul_(10)  # clearly distinct members, so routing picks different members per image
    names = list(INFO.prompt_names)
    small = predict(m, feats.val_features, names, INFO, batch_size=3)
    large = predict(m, feats.val_features, names, INFO)
    assert torch.allclose(small, large, atol=1e-6)
    with torch.no_grad():
        expected = m.logits(feats.val_features, names, INFO).softmax(dim=-1)
    assert torch.allclose(large, expected, atol=1e-6)
    assert predict(m, feats.val_features[:0], names, INFO).shape == (0, INFO.n_classes)


# ---- learning ---------------------------------------------------------------------------------------------------
def test_prompt_learners_recover_a_planted_prompt(tiny_clip):
    """Image features are the text features of a hidden ("planted") prompt "<ctx*> <class>." plus noise, so a learned
    context can fit them and the hand template is only partly right: CoOp and BioVLM, trained with the paper's
    learning rate, must beat zero-shot on held-out images."""
    from biovlm.methods.base import PromptTokens

    g = torch.Generator().manual_seed(0)
    names = list(INFO.prompt_names)
    ids, _ = tiny_clip.tokenize(["blood cell image of"])
    with torch.no_grad():
        planted = tiny_clip.token_embeddings(ids)[0, 1:5][None].float()
        planted += 0.5 * torch.randn(planted.shape, generator=g)
        proto = PromptTokens(tiny_clip, 4).encode(planted, names)[0]

    def draw(labels, *extra):
        x = proto[labels].view(len(labels), *([1] * len(extra)), -1)
        return F.normalize(x + 0.3 * torch.randn(len(labels), *extra, proto.shape[1], generator=g), dim=-1)

    pool, test = torch.arange(8).repeat_interleave(16), torch.arange(8).repeat(30)
    feats = SimpleNamespace(pool_labels=pool, pool_clean=draw(pool),
                            pool_views={k: draw(pool, 2) for k in ("plain", "weak", "strong")},
                            val_features=draw(torch.arange(8)), val_labels=torch.arange(8))
    test_x = draw(test)
    cfg = {"train": {"epochs": 10, "lr": 0.002}}

    def accuracy(name):
        m = build_method(name, tiny_clip, cfg, INFO, attributes=ATTRS)
        fit(m, feats, range(len(pool)), cfg, seed=1)
        return (predict(m, test_x, names, INFO).argmax(1) == test).float().mean().item()

    acc = {name: accuracy(name) for name in ("zeroshot", "coop", "biovlm")}
    print("planted-prompt held-out accuracy", acc)
    assert acc["zeroshot"] > 1.5 / 8, acc
    assert acc["coop"] > acc["zeroshot"] + 0.1, acc
    assert acc["biovlm"] > acc["zeroshot"] + 0.1, acc


@pytest.mark.slow
def test_demo_learns_with_the_shipped_tiny_pretrained(tmp_path):
    """What the demo must show (zero-shot transfers; CoOp and BioVLM learn), with the demo's seeds and twins: every
    check of ``biovlm.learning_checks``, each an average or a share over the 11 datasets, not a single close number."""
    from biovlm import learning_checks
    from biovlm.config import load_config

    cfg = load_config(COMMITTED_PARAMS, {"profile": "demo"})
    assert cfg["backbone"]["name"] == "tiny-pretrained"
    checks = learning_checks.measure(cfg, cfg["seeds"], cfg["data"]["synthetic_seed"], tmp_path)
    print("\n".join(f"{'met' if ok else 'NOT MET'}: {check}" for check, ok in checks.items()))
    assert all(checks.values()), [check for check, ok in checks.items() if not ok]


# ---- the loop's numbers, against a plain computation ------------------------------------------------------------
class _Linear(Method):
    """loss = sum(w) (+ a term equal to the batch size): every step's gradient is 1, so the update is pure SGD."""

    name = "linear"

    def __init__(self, backbone, info, class_ids=None):
        super().__init__(backbone, {}, info, range(info.n_classes) if class_ids is None else class_ids)
        self.w = nn.Parameter(torch.zeros(3))
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.setup_args: tuple = ()
        self.modes: list[bool] = []

    def setup(self, features, labels, validation=None):
        self.setup_args = (features, labels, validation)

    def loss(self, batch):
        self.modes.append(self.training)
        loss = self.w.sum() + 0 * batch["plain"].sum()
        return loss, {"loss": loss.item(), "size": float(len(batch["labels"]))}

    def text_head(self, class_names, info, attributes=None):
        return len(class_names)

    def head_logits(self, head, image_features):
        return image_features[:, :head] * 0


def plain_sgd(lrs: list[float], steps_per_epoch: int, momentum: float, weight_decay: float) -> float:
    """w after SGD on loss = w (gradient 1 + weight_decay * w), written out step by step (torch's formula)."""
    w, buf = 0.0, None
    for lr in lrs:
        for _ in range(steps_per_epoch):
            g = 1.0 + weight_decay * w
            buf = g if buf is None else momentum * buf + g
            w -= lr * buf
    return w


def test_history_learning_rates_and_updates_follow_the_schedule(tiny_backbone):
    """Epoch 0 runs at warmup_lr, then the cosine; the optimizer really steps with each epoch's rate, with the
    configured momentum and weight decay; per-epoch stats are means over images (batches of unequal size)."""
    feats = features_for(tiny_backbone.embed_dim, shots=5)  # 40 images: batches of 16, 16, 8
    feats.val_labels = None
    knobs = {"epochs": 4, "lr": 0.1, "warmup_epochs": 1, "warmup_lr": 1e-3, "batch_size": 16, "momentum": 0.5,
             "weight_decay": 0.1}
    m = _Linear(tiny_backbone, INFO)
    history = fit(m, feats, range(40), {"train": knobs}, seed=0)
    lrs = [r["lr"] for r in history["epochs"]]
    assert lrs[0] == 1e-3
    assert lrs == [lr_at(e, train_knobs({"train": knobs})) for e in range(4)]
    assert lrs[1:] == pytest.approx([0.1, 0.05 * (1 + math.cos(math.pi / 3)), 0.05 * (1 + math.cos(2 * math.pi / 3))])
    expected = plain_sgd(lrs, 3, momentum=0.5, weight_decay=0.1)
    torch.testing.assert_close(m.w.detach(), torch.full((3,), expected), rtol=1e-5, atol=1e-7)
    assert torch.equal(m.frozen, torch.zeros(3))
    assert [r["size"] for r in history["epochs"]] == [(16 * 16 + 16 * 16 + 8 * 8) / 40] * 4
    assert [r["epoch"] for r in history["epochs"]] == [0, 1, 2, 3] and history["steps"] == 12
    assert history["seconds"] > 0 and not m.training
    with pytest.raises(ValueError, match="^fit needs at least one training position$"):
        fit(m, feats, [], {"train": knobs}, seed=0)


def test_two_warmup_epochs_then_cosine_over_the_rest():
    k = train_knobs({"train": {"epochs": 6, "lr": 0.2, "warmup_epochs": 2, "warmup_lr": 0.01}})
    assert [lr_at(e, k) for e in range(6)] == pytest.approx(
        [0.01, 0.01, 0.2, 0.1 * (1 + math.cos(math.pi / 4)), 0.1, 0.1 * (1 + math.cos(3 * math.pi / 4))])
    k = train_knobs({"train": {"epochs": 2, "lr": 0.2, "warmup_epochs": 2, "warmup_lr": 0.01}})
    assert lr_at(2, k) == pytest.approx(0.2)  # no epoch left after the warm-up: the span is at least one epoch
    assert lr_at(3, k) == pytest.approx(0.0, abs=1e-12)


def test_validation_uses_the_runs_own_rows_of_the_methods_classes(tiny_backbone):
    from biovlm.train import _val_set

    feats = features_for(tiny_backbone.embed_dim)  # val labels 0..7, 0..7
    x, y = _val_set(feats, [3, 1, 0], "cpu", rows=[0, 9, 3, 12])  # labels 0, 1, 3, 4
    assert torch.equal(x, feats.val_features[[0, 9, 3]]) and y.tolist() == [2, 1, 0]
    x, y = _val_set(feats, [5], "cpu")
    assert torch.equal(x, feats.val_features[[5, 13]]) and y.tolist() == [0, 0]
    assert _val_set(feats, [5], "cpu", rows=[0, 1]) == (None, None)
    assert _val_set(SimpleNamespace(val_features=feats.val_features, val_labels=[]), [0], "cpu") == (None, None)
    assert _val_set(SimpleNamespace(val_labels=feats.val_labels), [0], "cpu") == (None, None)
    assert _val_set(SimpleNamespace(val_features=feats.val_features), [0], "cpu") == (None, None)


def test_a_feature_set_without_plain_views_is_refused(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)
    del feats.pool_views["plain"]
    with pytest.raises(ValueError, match=r"^the feature set has no 'plain' views \(has \['strong', 'weak'\]\)$"):
        fit(_Linear(tiny_backbone, INFO), feats, range(8), {"train": {"epochs": 1}}, seed=0)


def test_non_finite_loss_messages_name_every_bad_term():
    from biovlm.train import _check_finite

    m = SimpleNamespace(name="m")
    _check_finite(m, torch.tensor(1.0), {"loss": float("nan")}, 0, 0)  # a finite loss passes whatever the stats
    with pytest.raises(NonFiniteLossError, match=re.escape(
            "m: loss term(s) 'a', 'b' became inf at epoch 2, step 7; lower train.lr or the weight of that term")):
        _check_finite(m, torch.tensor(float("inf")), {"a": float("inf"), "acc": float("nan"), "b": float("nan"),
                                                       "c": 1.0}, 2, 7)
    with pytest.raises(NonFiniteLossError, match=re.escape("m: loss term(s) 'loss' became -inf at epoch 0, step 1;")):
        _check_finite(m, torch.tensor(float("-inf")), {"acc": 0.5}, 0, 1)
    with pytest.raises(NonFiniteLossError, match=re.escape("m: loss term(s) 'loss' became nan at epoch 0, step 1;")):
        _check_finite(m, torch.tensor(float("inf")), {"loss": float("nan")}, 0, 1)  # the term's own value


@pytest.mark.parametrize(("knob", "value", "message"), [
    ("epochs", 0, "train.epochs must be a positive integer, got 0"),
    ("epochs", True, "train.epochs must be a positive integer, got True"),
    ("epochs", 2.0, "train.epochs must be a positive integer, got 2.0"),
    ("eval_batch_size", 0, "train.eval_batch_size must be a positive integer, got 0"),
    ("val_every", 0, "train.val_every must be a positive integer, got 0"),
    ("warmup_epochs", -1, "train.warmup_epochs must be an integer >= 0, got -1"),
    ("warmup_epochs", True, "train.warmup_epochs must be an integer >= 0, got True"),
    ("warmup_epochs", 1.0, "train.warmup_epochs must be an integer >= 0, got 1.0"),
    ("lr", float("nan"), "train.lr must be a number >= 0, got nan"),
    ("lr", True, "train.lr must be a number >= 0, got True"),
    ("lr", "0.1", "train.lr must be a number >= 0, got '0.1'"),
    ("momentum", -0.5, "train.momentum must be a number >= 0, got -0.5"),
    ("weight_decay", -1, "train.weight_decay must be a number >= 0, got -1"),
    ("warmup_lr", -1e-5, "train.warmup_lr must be a number >= 0, got -1e-05"),
])
def test_each_bad_train_knob_is_named(knob, value, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train_knobs({"train": {knob: value}})


def test_train_knobs_accept_the_edges_and_list_the_valid_ones():
    edges = {"epochs": 1, "warmup_epochs": 0, "lr": 0, "momentum": 0, "weight_decay": 0, "warmup_lr": 0}
    assert train_knobs({"train": edges}) == {**TRAIN_DEFAULTS, **edges}
    assert train_knobs({}) == train_knobs({"train": None}) == TRAIN_DEFAULTS
    message = f"unknown train knob(s) ['a', 'b']; valid: {sorted(TRAIN_DEFAULTS)}"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train_knobs({"train": {"b": 1, "a": 2, "lr": 1}})


def test_predict_restores_the_mode_and_caps_the_batch(tiny_backbone):
    seen = []

    class Head(_Linear):
        max_predict_batch = 3

        def head_logits(self, head, image_features):
            seen.append(len(image_features))
            return image_features[:, :head].double()

    m = Head(tiny_backbone, INFO)
    x = torch.randn(7, 8)
    m.train()
    probs = predict(m, x, ["a", "b", "c"], INFO, batch_size=5)
    assert m.training and seen == [3, 3, 1] and probs.dtype == torch.float32
    torch.testing.assert_close(probs, x[:, :3].softmax(dim=-1))
    m.eval()
    seen.clear()
    predict(m, x, ["a", "b"], INFO, batch_size=2)
    assert not m.training and seen == [2, 2, 2, 1]


def test_fit_hands_setup_the_shots_and_validates_every_epoch_in_train_mode(tiny_backbone):
    feats = features_for(tiny_backbone.embed_dim)  # pool: 4 shots of each of 8 classes; val: 0..7, 0..7
    m = _Linear(tiny_backbone, INFO, class_ids=[2, 0])  # the method's classes, in its own order
    history = fit(m, feats, [9, 0, 1], {"train": {"epochs": 3, "batch_size": 2}}, seed=0, val_rows=[0, 2, 10, 5])
    features, labels, (val_x, val_y) = m.setup_args
    assert torch.equal(features, feats.pool_clean[[9, 0, 1]]) and labels.tolist() == [0, 1, 1]
    assert torch.equal(val_x, feats.val_features[[0, 2, 10]]) and val_y.tolist() == [1, 0, 0]
    # the head scores every class alike, so the prediction is the first class (2): right on 2 of 3 validation shots
    assert [r["val_acc"] for r in history["epochs"]] == pytest.approx([2 / 3] * 3)
    assert m.modes == [True] * 6 and not m.training
    one = fit(_Linear(tiny_backbone, INFO), feats, [5], {"train": {"epochs": 1}}, seed=0)
    assert one["steps"] == 1
    m = _Linear(tiny_backbone, INFO)
    fit(m, feats, [5], {"train": {"epochs": 1}}, seed=0, val_rows=[])
    assert m.setup_args[2] is None


def test_train_defaults_are_coops_published_schedule():
    assert TRAIN_DEFAULTS == {"epochs": 50, "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
                              "warmup_lr": 1e-5, "batch_size": 32, "eval_batch_size": 1024, "val_every": 1}


def test_autocast_is_bf16_on_cuda_and_off_on_cpu():
    import warnings

    from biovlm.train import _autocast

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no CUDA here: torch warns that it disables the context
        cuda = _autocast(torch.device("cuda"))
    assert cuda.device == "cuda" and cuda.fast_dtype == torch.bfloat16
    with _autocast(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
