"""Entropy routing on hand-built logits: which members are kept, ties, ratio edge cases, gradients."""

from __future__ import annotations

import math
import re

import pytest
import torch

from biovlm.routing import kept_logits, member_entropy, n_keep, route, route_members


def _member(confidence: float, n_classes: int = 3, top: int = 0) -> list[float]:
    """Logits with one peak of height ``confidence`` (higher -> lower entropy)."""
    row = [0.0] * n_classes
    row[top] = confidence
    return row


def test_keeps_exactly_the_lowest_entropy_members():
    # 5 members, confidences chosen so the entropy order is 3 < 0 < 4 < 1 < 2
    conf = [4.0, 1.0, 0.0, 8.0, 2.0]
    logits = torch.tensor([[_member(c, top=i % 3) for i, c in enumerate(conf)]])  # [1, 5, 3]
    out, kept = route_members(logits, 0.5)  # ceil(2.5) = 3 members
    assert kept.tolist() == [[3, 0, 4]]
    assert torch.allclose(out, logits[0, [3, 0, 4]].mean(dim=0, keepdim=True))
    ent = member_entropy(logits)[0]
    assert ent[3] < ent[0] < ent[4] < ent[1] < ent[2]


def test_each_image_routes_independently():
    a = [_member(5.0), _member(0.5), _member(0.0)]
    b = [_member(0.0), _member(0.5), _member(5.0)]
    logits = torch.tensor([a, b])
    _, kept = route_members(logits, 1 / 3)
    assert kept.tolist() == [[0], [2]]
    assert torch.equal(route(logits, 1 / 3), torch.stack([logits[0, 0], logits[1, 2]]))


def test_ties_keep_the_lower_member_index_first():
    same = _member(1.0)
    logits = torch.tensor([[same, _member(3.0), same, same, _member(3.0, top=1)]])
    # entropies: members 1 and 4 tie (lowest), members 0, 2, 3 tie
    _, kept = route_members(logits, 0.6)  # 3 members
    assert kept.tolist() == [[1, 4, 0]]
    _, kept = route_members(logits, 0.8)  # 4 members
    assert kept.tolist() == [[1, 4, 0, 2]]
    # identical members everywhere: the first k
    _, kept = route_members(torch.zeros(2, 6, 4), 0.5)
    assert kept.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_ratio_one_is_the_plain_mean_of_all_members():
    logits = torch.randn(4, 7, 5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(route(logits, 1.0), logits.mean(dim=1), atol=1e-6)


@pytest.mark.parametrize(("m", "ratio", "k"), [(10, 0.5, 5), (10, 0.3, 3), (10, 0.25, 3), (10, 0.01, 1),
                                               (1, 0.5, 1), (3, 1.0, 3), (7, 0.7, 5)])
def test_number_kept_is_ceil_of_ratio_times_m(m, ratio, k):
    assert n_keep(m, ratio) == k  # 0.3 * 10 = 3.0000000000000004 must still give 3
    assert route_members(torch.zeros(2, m, 3), ratio)[1].shape == (2, k)


@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, 1.01, 2, float("nan")])
def test_ratio_outside_zero_one_is_refused(ratio):
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        route(torch.zeros(1, 4, 3), ratio)


def test_wrong_shape_is_refused():
    with pytest.raises(ValueError, match=r"\[B, M, C\]"):
        route(torch.zeros(4, 3), 0.5)


def test_entropy_values():
    logits = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [100.0, 0.0, 0.0, 0.0]]])
    ent = member_entropy(logits)[0]
    assert ent[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert ent[1].item() == pytest.approx(0.0, abs=1e-6)


def test_gradient_flows_only_into_kept_members():
    logits = torch.tensor([[_member(3.0), _member(0.1), _member(2.0), _member(0.0)]], requires_grad=True)
    route(logits, 0.5).sum().backward()
    assert logits.grad[0, :, 0].tolist() == [0.5, 0.0, 0.5, 0.0]
    _, kept = route_members(logits, 0.5)
    assert torch.equal(kept_logits(logits, kept), logits[:, [0, 2]])


def test_ties_are_broken_by_member_index_even_in_a_large_bank():
    """A stable sort: an unstable one reorders equal entropies once the bank is large (here 3000 members)."""
    _, kept = route_members(torch.zeros(2, 3000, 4), 0.5)
    assert torch.equal(kept, torch.arange(1500).expand(2, -1))


def test_at_least_one_member_is_kept_for_a_tiny_ratio():
    assert n_keep(4, 1e-12) == 1  # ceil(4e-12 - 1e-9) would be 0
    assert n_keep(1, 1.0) == 1 and n_keep(1000, 0.001) == 1 and n_keep(1000, 0.0011) == 2


@pytest.mark.parametrize("ratio", [0, 1.01, float("nan"), "0.5", None])
def test_ratio_error_message(ratio):
    with pytest.raises(ValueError, match=rf"^routing ratio must be in \(0, 1\], got {re.escape(repr(ratio))}$"):
        n_keep(4, ratio)


def test_an_empty_bank_is_refused():
    with pytest.raises(ValueError, match="^routing needs at least one member, got 0$"):
        n_keep(0, 0.5)
    with pytest.raises(ValueError, match="^routing needs at least one member, got 0$"):
        route(torch.zeros(2, 0, 3), 0.5)
    with pytest.raises(ValueError, match=r"^member_logits must be \[B, M, C\], got shape \(2, 3, 4, 1\)$"):
        route(torch.zeros(2, 3, 4, 1), 0.5)


def test_entropy_is_over_the_class_axis_in_float32():
    """Half-precision logits (autocast) are ranked by float32 entropies; each member's entropy is over its C classes."""
    logits = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 0.0, 5.0]]])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits[0].tolist()]
    expected = [-sum(q * math.log(q) for q in row) for row in p]
    ent = member_entropy(logits.half())
    assert ent.dtype == torch.float32 and ent.shape == (1, 2)
    assert ent[0].tolist() == pytest.approx(expected, abs=1e-6)


def test_kept_members_are_listed_by_increasing_entropy():
    logits = torch.tensor([[_member(1.0), _member(0.0), _member(9.0), _member(4.0)]])
    out, kept = route_members(logits, 1.0)
    assert kept.tolist() == [[2, 3, 0, 1]]
    assert torch.allclose(out, logits.mean(dim=1))
