"""BioVLM: a bank of M learned contexts with entropy routing, distilled from an attribute-ensemble teacher.

Student. M contexts (``bank_size``) of ``n_ctx`` word-embedding vectors each; prompt (m, c) is
``"[start] ctx_m <class name> . [end]"``. All M x C prompts are encoded in one batched call, giving text features
t[m, c]. For an image feature f, member m's logits are scale * f . t[m, :]; ``biovlm.routing`` keeps the
ceil(select_ratio * M) members with the lowest entropy and averages their logits. The same routing runs at test
time on any class list (base, novel, another dataset's), so a checkpoint is class-agnostic.

Teacher. The filtered attributes give J zero-shot classifiers (classifier j = attribute j of every class, text
``"<modality> of <class>, which has <attribute>"``), encoded once per class list. Per image, the lowest-entropy
fraction ``teacher_ratio`` of them is kept and averaged: one teacher on the plain view (J classifiers), one on the
weak and strong views pooled (2J view-classifier pairs).

Loss = CE(routed, y)
     + l_ent * mean_b H(mean of the kept members' softmax)
     + l_kd  * KL(teacher_plain || routed)      (temperature tau, tau^2-scaled; reduction ``kl_reduction``)
     + l_aug * KL(teacher_aug   || routed)
     + l_cos * (1 - mean_c cos(mean_m t[m, c], mean_j a[j, c]))   (cosine over the feature axis)
A weight of 0 removes its term (and it is not computed); every term reaches the bank through the student.

Deviations from the public reference implementation (github.com/mainaksingha01/BioVLM, trainers/biovlm.py):
1. Its training branch reads ``output`` before assigning it (the student selection call is missing), so training
   crashes; here the student is routed in training exactly as in its test branch.
2. Its entropy terms are built with ``torch.tensor(list_of_losses)``, which detaches them: they add a constant
   and never train anything. Here the entropy term is part of the graph. Its two teacher-entropy terms depend
   only on frozen text and images (no learned tensor), so they are dropped.
3. It embeds the prompts with the full BERT embedding module (word + position + type embeddings, LayerNorm) and
   feeds the result to the encoder as ``inputs_embeds``, which adds position embeddings a second time. Here the
   prompts are word embeddings only (``backbone.token_embeddings``).
4. Its cosine term compares [M, C, D] bank features with [J, C, D] attribute features along dim 1, the class
   axis; here the cosine is over the feature axis between per-class means.
5. It applies colour jitter to already-normalised tensors (fixed in ``biovlm.features``, which augments uint8
   images before normalisation).
6. Its bank size is tied to exactly 10 attributes per class (the cosine term needs M == J); here M and J are
   independent.
Also: it re-encodes every attribute text on every step (here once per class list); it selects int(top * M)
members (floor) where this uses ceil(select_ratio * M) (identical for the default 0.5 x 10); its KL terms are the
summed KL divided by B*M*C (``kl_reduction: reference`` reproduces that, the default is ``batchmean``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biovlm.methods.base import (
    PromptMethod,
    accuracy,
    check_non_negative,
    check_positive_int,
    check_ratio,
    cosine_logits,
)
from biovlm.methods.losses import KL_REDUCTIONS, entropy_of_mean, kl_distill, text_alignment
from biovlm.routing import kept_logits, route, route_members


def bank_logits(scale: float, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """[B, D] image features and [M, C, D] text features -> [B, M, C] member logits."""
    return cosine_logits(scale, image_features, text, "bd,mcd->bmc")


class BioVLM(PromptMethod):
    name = "biovlm"
    DEFAULTS = {"bank_size": 10, "n_ctx": 4, "ctx_init": "", "select_ratio": 0.5, "teacher_ratio": 0.5,
                "tau": 1.0, "l_ent": 0.5, "l_kd": 1.0, "l_aug": 1.0, "l_cos": 0.5, "kl_reduction": "reference"}

    @property
    def n_contexts(self) -> int:  # type: ignore[override]
        return self.knobs["bank_size"]

    @property
    def needs_attributes(self) -> bool:  # type: ignore[override]
        return any(self.knobs[k] > 0 for k in ("l_kd", "l_aug", "l_cos"))

    def validate_knobs(self) -> None:
        check_positive_int(self.name, self.knobs, "bank_size", "n_ctx")
        check_ratio(self.name, self.knobs, "select_ratio", "teacher_ratio")
        check_non_negative(self.name, self.knobs, "l_ent", "l_kd", "l_aug", "l_cos")
        if not self.knobs["tau"] > 0:
            raise ValueError(f"biovlm.tau must be > 0, got {self.knobs['tau']!r}")
        if self.knobs["kl_reduction"] not in KL_REDUCTIONS:
            raise ValueError(f"biovlm.kl_reduction must be one of {KL_REDUCTIONS}, "
                             f"got {self.knobs['kl_reduction']!r}")

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return route(bank_logits(self.scale, image_features, head), self.knobs["select_ratio"])

    def teacher_logits(self, views: list[torch.Tensor], classifiers: torch.Tensor) -> torch.Tensor:
        """Route the J attribute classifiers [J, C, D] over the pooled views ([B, D] each) -> [B, C]."""
        member = torch.cat([bank_logits(self.scale, v, classifiers) for v in views], dim=1)  # [B, V*J, C]
        return route(member, self.knobs["teacher_ratio"])

    def loss_terms(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Unweighted terms (only those with a weight > 0, plus ce) and the routed logits."""
        k = self.knobs
        text = self.prompt_features(self.class_names)  # [M, C, D]
        member = bank_logits(self.scale, batch["plain"], text)
        logits, kept = route_members(member, k["select_ratio"])
        terms = {"ce": F.cross_entropy(logits, batch["labels"])}
        if k["l_ent"] > 0:
            terms["ent"] = entropy_of_mean(kept_logits(member, kept))
        if k["l_kd"] > 0 or k["l_aug"] > 0 or k["l_cos"] > 0:
            classifiers, attr_mean = self.attribute_features(self.class_names, self.info, self.attributes)
            with torch.no_grad():
                if k["l_kd"] > 0:
                    t_plain = self.teacher_logits([batch["plain"]], classifiers)
                if k["l_aug"] > 0:
                    t_aug = self.teacher_logits([batch["weak"], batch["strong"]], classifiers)
            n = text.shape[0]
            if k["l_kd"] > 0:
                terms["kd"] = kl_distill(logits, t_plain, k["tau"], k["kl_reduction"], n_members=n)
            if k["l_aug"] > 0:
                terms["aug"] = kl_distill(logits, t_aug, k["tau"], k["kl_reduction"], n_members=n)
            if k["l_cos"] > 0:
                terms["cos"] = text_alignment(text.mean(dim=0), attr_mean)
        return terms, logits

    def loss(self, batch):
        terms, logits = self.loss_terms(batch)
        weights = {"ce": 1.0, "ent": self.knobs["l_ent"], "kd": self.knobs["l_kd"], "aug": self.knobs["l_aug"],
                   "cos": self.knobs["l_cos"]}
        total = sum(weights[name] * value for name, value in terms.items())
        stats = {"loss": total.item(), **{name: v.item() for name, v in terms.items()},
                 "acc": accuracy(logits, batch["labels"])}
        return total, stats
