"""CoCoOp (Zhou et al., 2022): a meta-network maps each image feature to a shift of the shared context, so every
image gets its own prompts. The text is encoded per image: all B x C prompts of a batch go in one call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biovlm.methods.base import PromptMethod, accuracy, check_positive_int, cosine_logits


class CoCoOp(PromptMethod):
    name = "cocoop"
    DEFAULTS = {"n_ctx": 4, "ctx_init": "", "meta_reduction": 16}
    max_predict_batch = 64  # B x C prompts per text-encoder call at test time

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        d, hidden = backbone.embed_dim, max(1, backbone.embed_dim // self.knobs["meta_reduction"])
        self.meta_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, backbone.text_width))
        self.meta_net.to(self.device)

    def validate_knobs(self) -> None:
        check_positive_int(self.name, self.knobs, "meta_reduction")

    def reset_parameters(self, generator: torch.Generator) -> None:
        super().reset_parameters(generator)
        with torch.no_grad():  # nn.Linear's default init, drawn from the generator
            for layer in self.meta_net:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
                    bound = 1 / math.sqrt(layer.in_features)
                    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)

    def text_head(self, class_names, info, attributes=None):
        return list(class_names)  # prompts depend on the image: encoded in head_logits

    def head_logits(self, head, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.float()
        ctx = self.ctx[0][None] + self.meta_net(f)[:, None, :]  # [B, n_ctx, W]
        text = self.tokens.encode(ctx, head)  # [B, C, D]
        return cosine_logits(self.scale, f, text, "bd,bcd->bc")

    def loss(self, batch):
        logits = self.head_logits(self.class_names, batch["plain"])
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce, {"loss": ce.item(), "ce": ce.item(), "acc": accuracy(logits, batch["labels"])}
