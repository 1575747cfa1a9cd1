"""The training-step benchmark's re-creation of the reference compute pattern computes the project's BioVLM loss.

bench/train_step.py times this project's BioVLM step against ``ReferenceBioVLM`` (three image-tower passes, prompts
and attribute texts padded to the full context, per-sample Python loops). Its speed-up only means something if both
compute the same loss and the same gradient; this checks that on the two tiny text-tower kinds (BERT and CLIP).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def train_step():
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module("train_step")
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def tiny_clip():
    """tiny's image tower with a CLIP text tower: random, but its text features do not collapse (the random tiny
    BERT maps every text to nearly one feature, which would leave the distillation terms and gradients at noise
    level). Padding equivalence of the BERT kind is checked at full size by every run of the benchmark."""
    from biovlm.backbone import load_backbone

    return load_backbone("tiny-clip")


def test_reference_pattern_gives_the_project_loss_and_gradient(train_step, tiny_clip):
    images, labels = train_step.batch_images(28, 12)
    method, views, reference, labels = train_step.build_pair(tiny_clip, 3, images, labels)
    with torch.no_grad():  # a spread-out bank, so that routing picks distinct members per image
        method.ctx.mul_(40)
        reference.ctx.copy_(method.ctx)
    batch = train_step.cache_features(tiny_clip, views, labels)
    assert reference.prompt_ids.shape[1] == tiny_clip.context_length  # padded, unlike the project's prompts

    ours, stats = method.loss(batch)
    theirs, ref_stats = reference.loss(views, labels)
    for term in ("ce", "ent", "kd", "aug", "cos"):
        assert ref_stats[term] == pytest.approx(stats[term], rel=1e-4), term
    assert min(stats["kd"], stats["aug"], stats["cos"]) > 1e-3  # no term is vanishingly small
    ours.backward()
    theirs.backward()
    assert method.ctx.grad.abs().max() > 1e-3
    torch.testing.assert_close(reference.ctx.grad, method.ctx.grad, rtol=1e-3, atol=1e-6)

    # one SGD step each keeps them together
    train_step.sgd(method.parameters()).step()
    train_step.sgd(reference.parameters()).step()
    after, _ = method.loss(batch)
    ref_after, _ = reference.loss(views, labels)
    assert ref_after.item() == pytest.approx(after.item(), rel=1e-4)
    assert after.item() != pytest.approx(ours.item(), rel=1e-6)  # the step changed the bank

    # the public implementation's KL scaling (summed KL / (B * M * C) instead of / B) agrees too
    with torch.no_grad():
        _, batchmean = method.loss(batch)
        method.knobs["kl_reduction"] = reference.knobs["kl_reduction"] = "reference"
        _, stats = method.loss(batch)
        _, ref_stats = reference.loss(views, labels)
    assert stats["kd"] == pytest.approx(batchmean["kd"] / (10 * 11), rel=1e-5)
    assert ref_stats["kd"] == pytest.approx(stats["kd"], rel=1e-4)
