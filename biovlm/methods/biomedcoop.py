"""BiomedCoOp (Koleilat et al., 2025): CoOp + two knowledge terms built from per-class attribute texts.

- ``sccm``: MSE between the learned class text features and the mean attribute text feature of each class
  (weight ``sccm_lambda``).
- ``kdsp``: KL(teacher || student) to an attribute-ensemble zero-shot teacher whose outlier attributes are pruned
  on every batch, as the public code (github.com/HealthX-Lab/BiomedCoOp, trainers/BiomedCoOp/
  biomedcoop_biomedclip.py) does: attribute classifier j (attribute j of every class) scores the batch's mean
  max-logit s_j; classifiers with |s_j - mean(s)| / std(s) > ``prune_z`` (its ``TAU``) are dropped and the teacher
  is the normalised mean of the rest (weight ``kdsp_lambda``, KL scaling ``kl_reduction``, temperature ``tau``).

The public code computes a robust z-score (s - median) / MAD and then standardises it with its mean and std; a
standardised affine function of s is the plain z-score of s, which is what is computed here (and a batch whose
scores are all equal prunes nothing, where the public code divides by a zero MAD; a batch on which every
classifier is an outlier, possible below a threshold of 1, keeps them all, where the public code's teacher is NaN).
It has no KL temperature (``tau`` 1 reproduces it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biovlm.methods.base import PromptMethod, accuracy, check_non_negative, cosine_logits
from biovlm.methods.losses import KL_REDUCTIONS, kl_distill


def prune_mask(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool mask of the scores whose z-score |s - mean| / std (unbiased) is <= threshold (all if std is 0, or if
    none is)."""
    if scores.numel() < 2:
        return torch.ones_like(scores, dtype=torch.bool)
    std = scores.std()
    if not std > 0:
        return torch.ones_like(scores, dtype=torch.bool)
    keep = ((scores - scores.mean()).abs() / std) <= threshold
    # below a threshold of 1 every score can be an outlier; an empty teacher would be NaN (so is the public code's)
    return keep if bool(keep.any()) else torch.ones_like(keep)


class BiomedCoOp(PromptMethod):
    name = "biomedcoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "", "sccm_lambda": 1.0, "kdsp_lambda": 1.0, "prune_z": 1.5, "tau": 1.0,
                "kl_reduction": "reference"}

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

    def teacher(self, image_features: torch.Tensor) -> torch.Tensor:
        """The pruned attribute-ensemble classifier [C, D] for this batch of image features [B, D]."""
        classifiers, _ = self.attribute_features(self.class_names, self.info, self.attributes)  # [J, C, D]
        logits = cosine_logits(self.scale, image_features, classifiers, "bd,jcd->jbc")
        keep = prune_mask(logits.max(dim=-1).values.mean(dim=-1), self.knobs["prune_z"])  # scores [J]
        return F.normalize(classifiers[keep].mean(dim=0), dim=-1)

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
            with torch.no_grad():
                teacher = cosine_logits(self.scale, f, self.teacher(f))
            kdsp = kl_distill(logits, teacher, self.knobs["tau"], self.knobs["kl_reduction"])
            total = total + self.knobs["kdsp_lambda"] * kdsp
            terms["kdsp"] = kdsp.item()
        return total, {"loss": total.item(), **terms, "acc": accuracy(logits, batch["labels"])}
