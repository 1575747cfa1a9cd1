"""CoOp (Zhou et al., 2022): one learned context shared by all classes, trained with cross-entropy."""

from __future__ import annotations

import torch.nn.functional as F

from biovlm.methods.base import PromptMethod, accuracy


class CoOp(PromptMethod):
    name = "coop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": ""}

    def loss(self, batch):
        logits = self.head_logits(self.prompt_features(self.class_names), batch["plain"])
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce, {"loss": ce.item(), "ce": ce.item(), "acc": accuracy(logits, batch["labels"])}
