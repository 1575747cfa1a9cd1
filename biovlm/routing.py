"""Entropy routing: keep the most confident members of an ensemble and average their logits.

Used by the BioVLM student (M prompt-bank members) and by its attribute teacher (J attribute classifiers).
For each image, every member m gives logits over the C classes; its confidence is the entropy of
softmax(logits_m). The ceil(ratio * M) members with the lowest entropy are kept and their *logits* averaged.

Ties: members are ranked by a stable sort of their entropies, so among equal entropies the lower member index
is kept first. ``ceil`` is taken on ``ratio * M`` minus 1e-9 so that float noise (0.3 * 10 = 3.0000000000000004)
does not keep one member too many.
"""

from __future__ import annotations

import math

import torch


def n_keep(n_members: int, ratio: float) -> int:
    """Number of members kept: ceil(ratio * n_members), at least 1. ratio must lie in (0, 1]."""
    if not (isinstance(ratio, (int, float)) and 0.0 < float(ratio) <= 1.0):
        raise ValueError(f"routing ratio must be in (0, 1], got {ratio!r}")
    if n_members < 1:
        raise ValueError(f"routing needs at least one member, got {n_members}")
    return max(1, min(n_members, math.ceil(float(ratio) * n_members - 1e-9)))


def member_entropy(member_logits: torch.Tensor) -> torch.Tensor:
    """[B, M, C] logits -> [B, M] entropy (nats) of each member's softmax, computed in float32."""
    logp = member_logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def route_members(member_logits: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Route and also return which members were kept.

    Returns (logits [B, C], kept [B, k]) where kept holds member indices sorted by increasing entropy
    (stable: lower index first among ties). The selection itself carries no gradient; the averaged logits do.
    """
    if member_logits.dim() != 3:
        raise ValueError(f"member_logits must be [B, M, C], got shape {tuple(member_logits.shape)}")
    k = n_keep(member_logits.shape[1], ratio)
    with torch.no_grad():
        order = torch.sort(member_entropy(member_logits), dim=1, stable=True).indices
    kept = order[:, :k]
    return kept_logits(member_logits, kept).mean(dim=1), kept


def route(member_logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """[B, M, C] -> [B, C]: mean logits of the ceil(ratio * M) lowest-entropy members."""
    return route_members(member_logits, ratio)[0]


def kept_logits(member_logits: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Gather the kept members' logits: [B, M, C] and [B, k] -> [B, k, C] (differentiable)."""
    return member_logits.gather(1, kept.unsqueeze(-1).expand(-1, -1, member_logits.shape[-1]))
