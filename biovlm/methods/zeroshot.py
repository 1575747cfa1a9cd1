"""Zero-shot CLIP with the hand template ``"a <modality> of <class>."`` (nothing is learned)."""

from __future__ import annotations

import torch

from biovlm.methods.base import Method, cosine_logits


class ZeroShot(Method):
    name = "zeroshot"
    DEFAULTS: dict = {}
    trainable = False

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        return self.template_features(class_names, info)

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.scale, image_features, head)
