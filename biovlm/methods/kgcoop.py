"""KgCoOp (Yao et al., 2023): CoOp + lambda * mean over classes of (1 - cos(learned class text feature,
hand-template text feature)), keeping the learned prompts close to the general zero-shot knowledge."""

from __future__ import annotations

import torch.nn.functional as F

from biovlm.methods.base import PromptMethod, accuracy, check_non_negative
from biovlm.methods.losses import text_alignment


class KgCoOp(PromptMethod):
    name = "kgcoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "", "weight": 1.0}

    def validate_knobs(self) -> None:
        check_non_negative(self.name, self.knobs, "weight")

    def loss(self, batch):
        text = self.prompt_features(self.class_names)
        logits = self.head_logits(text, batch["plain"])
        ce = F.cross_entropy(logits.float(), batch["labels"])
        total, terms = ce, {"ce": ce.item()}
        if self.knobs["weight"] > 0:
            kg = text_alignment(text[0], self.template_features(self.class_names, self.info))
            total = total + self.knobs["weight"] * kg
            terms["kg"] = kg.item()
        return total, {"loss": total.item(), **terms, "acc": accuracy(logits, batch["labels"])}
