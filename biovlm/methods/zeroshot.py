"""Zero-shot CLIP with the hand template "a <modality> of <class>." (nothing is learned)."""

from __future__ import annotations

import torch

from biovlm.methods.base import Method


class ZeroShot(Method):
    name = "zeroshot"
    DEFAULTS: dict = {}
    trainable = False

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        return self.template_features(class_names, info)

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return self.scale * image_features.float() @ head.t()
