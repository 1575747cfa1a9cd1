"""Linear probe: multinomial logistic regression on the clean cached features of the training shots (sklearn,
L-BFGS, deterministic). The features are unit vectors, so the inverse L2 strength C is large by default.

It learns one weight vector per training class, so it cannot classify any other class list: ``logits`` on unseen
classes raises ``NotTransferable`` (the pipeline reports such cells as not applicable). A subset or reordering of
the training classes is fine."""

from __future__ import annotations

import torch

from biovlm.methods.base import Method, NotTransferable


class LinearProbe(Method):
    name = "linear_probe"
    DEFAULTS = {"C": 100.0, "max_iter": 1000, "tol": 1e-4}
    trainable = False
    class_specific = True

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        n_classes, d = len(self.class_ids), backbone.embed_dim
        self.register_buffer("weight", torch.zeros(n_classes, d, device=self.device))
        self.register_buffer("bias", torch.zeros(n_classes, device=self.device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=self.device))

    def validate_knobs(self) -> None:
        if not self.knobs["C"] > 0:
            raise ValueError(f"linear_probe.C (inverse L2 strength) must be > 0, got {self.knobs['C']!r}")
        if not isinstance(self.knobs["max_iter"], int) or self.knobs["max_iter"] < 1:
            raise ValueError(f"linear_probe.max_iter must be a positive integer, got {self.knobs['max_iter']!r}")
        if not self.knobs["tol"] > 0:
            raise ValueError(f"linear_probe.tol must be > 0, got {self.knobs['tol']!r}")

    def setup(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        from sklearn.linear_model import LogisticRegression

        x = features.float().cpu().double().numpy()
        y = labels.cpu().numpy()
        n_classes = len(self.class_ids)
        present = sorted(set(y.tolist()))
        if present != list(range(n_classes)):
            raise ValueError(f"linear probe needs shots of every training class 0..{n_classes - 1}, got {present}")
        if n_classes == 1:
            raise ValueError("linear probe needs at least two classes")
        clf = LogisticRegression(C=self.knobs["C"], max_iter=self.knobs["max_iter"],
                                 tol=self.knobs["tol"])
        clf.fit(x, y)
        w, b = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if n_classes == 2:  # sklearn stores one row for two classes: logits (0, w.x + b) give the same softmax
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        with torch.no_grad():
            self.weight.copy_(w.to(self.device))
            self.bias.copy_(b.to(self.device))
            self.fitted.fill_(True)

    def text_head(self, class_names, info, attributes=None) -> torch.Tensor:
        if not bool(self.fitted):
            raise RuntimeError("linear probe has not been fitted: run biovlm.train.fit first")
        missing = [n for n in class_names if n not in self.class_names] if info.name == self.info.name \
            else list(class_names)
        if missing:
            raise NotTransferable(f"linear_probe was trained on {self.info.name} classes {self.class_names} and "
                                  f"cannot classify unseen classes {missing} of {info.name}")
        return torch.tensor([self.class_names.index(n) for n in class_names], device=self.device)

    def head_logits(self, head: torch.Tensor, image_features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(image_features.device.type, enabled=False):
            return image_features.float() @ self.weight[head].t() + self.bias[head]
