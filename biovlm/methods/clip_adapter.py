"""CLIP-Adapter (Gao et al., 2021): a residual two-layer adapter on the image feature,
f' = normalise(alpha * adapter(f) + (1 - alpha) * f), classified by the hand-template text features.
Only the image side is learned, so it transfers to any class list through that class list's template."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from biovlm.methods.base import Method, accuracy, check_positive_int, check_ratio, cosine_logits


class ClipAdapter(Method):
    name = "clip_adapter"
    DEFAULTS = {"alpha": 0.5, "reduction": 4}

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        d = backbone.embed_dim
        hidden = max(1, d // self.knobs["reduction"])
        self.adapter = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.ReLU(),
                                     nn.Linear(hidden, d, bias=False), nn.ReLU())
        self.adapter.to(self.device)

    def validate_knobs(self) -> None:
        check_ratio(self.name, self.knobs, "alpha")
        check_positive_int(self.name, self.knobs, "reduction")

    def reset_parameters(self, generator: torch.Generator) -> None:
        with torch.no_grad():
            for layer in self.adapter:
                if isinstance(layer, nn.Linear):
                    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)

    def adapt(self, image_features: torch.Tensor) -> torch.Tensor:
        f = image_features.float()
        a = self.knobs["alpha"]
        return F.normalize(a * self.adapter(f) + (1 - a) * f, dim=-1)

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        return self.template_features(class_names, info)

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.scale, self.adapt(image_features), head)

    def loss(self, batch):
        logits = self.head_logits(self.template_features(self.class_names, self.info), batch["plain"])
        ce = F.cross_entropy(logits.float(), batch["labels"])
        return ce, {"loss": ce.item(), "ce": ce.item(), "acc": accuracy(logits, batch["labels"])}
