"""Zero-shot attribute ensemble: class c is the normalised mean of the normalised features of its attribute texts
(``"<modality> of <class>, which has <attribute>"``). Nothing is learned; any class list works given its attributes."""

from __future__ import annotations

import torch

from biovlm.methods.base import Method, cosine_logits


class ZeroShotAttr(Method):
    name = "zeroshot_attr"
    DEFAULTS: dict = {}
    trainable = False

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        if attributes is None and list(class_names) == self.class_names and info.name == self.info.name:
            attributes = self.attributes
        return self.attribute_features(class_names, info, attributes)[1]

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        return cosine_logits(self.scale, image_features, head)
