"""Pure loss functions shared by the methods (tensors in, scalar out; no model inside)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KL_REDUCTIONS = ("batchmean", "reference")


def entropy_of_mean(member_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of H(mean_k softmax(logits_k)) for [B, K, C] logits (the kept members).

    The mean prediction is formed in log space (log-mean-exp of log-softmaxes) for stability.
    """
    logp = member_logits.float().log_softmax(dim=-1)
    mean_logp = torch.logsumexp(logp, dim=1) - math.log(member_logits.shape[1])
    return -(mean_logp.exp() * mean_logp).sum(dim=1).mean()  # [B, C]: classes are axis 1


def kl_distill(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float = 1.0,
               reduction: str = "batchmean", n_members: int = 1) -> torch.Tensor:
    """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)) for [B, C] logits.

    reduction "batchmean": the summed KL divided by B (the textbook distillation loss).
    reduction "reference": the summed KL divided by B * n_members * C, the scaling of the public BioVLM and
    BiomedCoOp code (they divide by ``logits.numel()`` of the [B, M, C] member logits).
    The teacher is treated as a constant (no gradient flows into it).
    """
    if reduction not in KL_REDUCTIONS:
        raise ValueError(f"kl_reduction must be one of {KL_REDUCTIONS}, got {reduction!r}")
    if tau <= 0:
        raise ValueError(f"KL temperature tau must be > 0, got {tau}")
    log_s = (student_logits.float() / tau).log_softmax(dim=1)  # [B, C]: classes are axis 1
    log_t = (teacher_logits.detach().float() / tau).log_softmax(dim=1)
    total = F.kl_div(log_s, log_t, reduction="sum", log_target=True) * tau**2
    b, c = student_logits.shape
    return total / (b if reduction == "batchmean" else b * n_members * c)


def text_alignment(text_a: torch.Tensor, text_b: torch.Tensor) -> torch.Tensor:
    """1 - mean over classes of cos(text_a[c], text_b[c]); [C, D] each, cosine over the feature axis D."""
    return 1.0 - F.cosine_similarity(text_a.float(), text_b.float(), dim=-1, eps=1e-7).mean()
