"""BiomedCoOp (Koleilat et al., 2025): CoOp + two knowledge terms built from per-class attribute texts.

- ``sccm``: MSE between the learned class text features and the mean attribute text feature of each class
  (weight ``sccm_lambda``).
- ``kdsp``: KL(teacher || student) to an attribute-ensemble zero-shot teacher, whose outlier attributes are
  pruned. Attribute classifier j (attribute j of every class) is scored by its mean max-logit over the training
  shots; a robust z-score z_j = (s_j - median(s)) / (1.4826 * MAD(s)) flags outliers |z_j| > ``prune_z`` and the
  teacher is the normalised mean of the kept classifiers (weight ``kdsp_lambda``, KL scaling ``kl_reduction``).

Differences from the public implementation: the score is computed once on the training shots (the image tower is
frozen and the features cached, so it is constant) instead of on every batch, and the z-score is the plain robust
one (the public code standardises the robust z-scores a second time with their mean and std).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biovlm.methods.base import PromptMethod, accuracy, check_non_negative, cosine_logits
from biovlm.methods.losses import KL_REDUCTIONS, kl_distill


def robust_keep(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the scores whose robust z-score |s - median| / (1.4826 MAD) is <= threshold (all if MAD=0)."""
    med = scores.median()
    mad = (scores - med).abs().median()
    if mad <= 0:
        return torch.ones_like(scores, dtype=torch.bool)
    return ((scores - med).abs() / (1.4826 * mad)) <= threshold


class BiomedCoOp(PromptMethod):
    name = "biomedcoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "", "sccm_lambda": 1.0, "kdsp_lambda": 1.0, "prune_z": 1.5, "tau": 1.0,
                "kl_reduction": "reference"}

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        self._teacher: torch.Tensor | None = None
        self.kept_attributes: list[int] | None = None

    @property
    def needs_attributes(self) -> bool:  # type: ignore[override]
        return self.knobs["sccm_lambda"] > 0 or self.knobs["kdsp_lambda"] > 0

    def validate_knobs(self) -> None:
        check_non_negative(self.name, self.knobs, "sccm_lambda", "kdsp_lambda", "prune_z")
        if not self.knobs["tau"] > 0:
            raise ValueError(f"biomedcoop.tau must be > 0, got {self.knobs['tau']!r}")
        if self.knobs["kl_reduction"] not in KL_REDUCTIONS:
            raise ValueError(f"biomedcoop.kl_reduction must be one of {KL_REDUCTIONS}, "
                             f"got {self.knobs['kl_reduction']!r}")

    def setup(self, features: torch.Tensor, labels: torch.Tensor, validation=None) -> None:
        if self.knobs["kdsp_lambda"] <= 0:
            return
        classifiers, _ = self.attribute_features(self.class_names, self.info, self.attributes)  # [J, C, D]
        with torch.no_grad():
            logits = cosine_logits(self.scale, features.to(self.device), classifiers, "nd,jcd->jnc")
            scores = logits.max(dim=-1).values.mean(dim=-1)  # [J]
            keep = robust_keep(scores, self.knobs["prune_z"])
        self.kept_attributes = keep.nonzero().flatten().tolist()
        self._teacher = F.normalize(classifiers[keep].mean(dim=0), dim=-1)

    def extra_meta(self) -> dict:
        return {"kept_attributes": self.kept_attributes}

    def loss(self, batch):
        f = batch["plain"]
        text = self.prompt_features(self.class_names)
        logits = self.head_logits(text, f)
        ce = F.cross_entropy(logits.float(), batch["labels"])
        total, terms = ce, {"ce": ce.item()}
        if self.knobs["sccm_lambda"] > 0:
            _, mean = self.attribute_features(self.class_names, self.info, self.attributes)
            sccm = F.mse_loss(text[0].float(), mean)
            total = total + self.knobs["sccm_lambda"] * sccm
            terms["sccm"] = sccm.item()
        if self.knobs["kdsp_lambda"] > 0:
            if self._teacher is None:
                raise RuntimeError("biomedcoop: setup() was not called (train with biovlm.train.fit)")
            teacher = cosine_logits(self.scale, f, self._teacher)
            kdsp = kl_distill(logits, teacher, self.knobs["tau"], self.knobs["kl_reduction"])
            total = total + self.knobs["kdsp_lambda"] * kdsp
            terms["kdsp"] = kdsp.item()
        return total, {"loss": total.item(), **terms, "acc": accuracy(logits, batch["labels"])}
