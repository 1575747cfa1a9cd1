"""Linear probe: multinomial logistic regression on the clean cached features of the training shots (sklearn,
L-BFGS, deterministic), its inverse L2 strength C chosen on the run's own validation shots.

C search (``C: search``), CoOp's linear-probe protocol (``lpclip/linear_probe.py``): validation accuracy for C in
``SEARCH_GRID`` (1e6 down to 1e-6), then ``search_steps`` bisection steps in log10 space between a tenth and ten
times the best: each step fits both ends, keeps the better one (the smaller C on a tie) and halves the interval
towards it; the last kept C is used. A number for ``C`` fixes it instead. The chosen C and the validation
accuracies are recorded in the checkpoint's metadata.

It learns one weight vector per training class, so it cannot classify any other class list: ``logits`` on unseen
classes raises ``NotTransferable`` (the pipeline reports such cells as not applicable). A subset or reordering of
the training classes is fine."""

from __future__ import annotations

import math

import numpy as np
import torch

from biovlm.methods.base import Method, NotTransferable

SEARCH_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


def search_c(accuracy, steps: int) -> tuple[float, list[tuple[float, float]]]:
    """The C that ``accuracy(C)`` (validation accuracy) picks by the grid-then-bisection search; returns
    ``(C, [(C tried, accuracy), ...])``."""
    tried: list[tuple[float, float]] = []

    def score(c: float) -> float:
        tried.append((c, accuracy(c)))
        return tried[-1][1]

    grid = [score(c) for c in SEARCH_GRID]
    peak = math.log10(SEARCH_GRID[int(np.argmax(grid))])
    lo, hi, best = peak - 1, peak + 1, peak
    for _ in range(steps):
        if score(10.0**lo) < score(10.0**hi):
            best, lo = hi, (lo + hi) / 2
        else:
            best, hi = lo, (lo + hi) / 2
    return 10.0**best, tried


class LinearProbe(Method):
    name = "linear_probe"
    DEFAULTS = {"C": "search", "search_steps": 8, "max_iter": 1000, "tol": 1e-4}
    trainable = False
    class_specific = True

    def __init__(self, backbone, knobs, info, class_ids, attributes=None):
        super().__init__(backbone, knobs, info, class_ids, attributes)
        n_classes, d = len(self.class_ids), backbone.embed_dim
        self.register_buffer("weight", torch.zeros(n_classes, d, device=self.device))
        self.register_buffer("bias", torch.zeros(n_classes, device=self.device))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool, device=self.device))
        self.chosen_c: float | None = None
        self.search: list[tuple[float, float]] = []

    def validate_knobs(self) -> None:
        c = self.knobs["C"]
        if c != "search" and not (isinstance(c, int | float) and not isinstance(c, bool) and c > 0):
            raise ValueError(f"linear_probe.C must be 'search' (chosen on the validation shots) or a number > 0, "
                             f"got {c!r}")
        for knob in ("max_iter", "search_steps"):
            if not isinstance(self.knobs[knob], int) or self.knobs[knob] < (knob == "max_iter"):
                raise ValueError(f"linear_probe.{knob} must be a {'positive' if knob == 'max_iter' else 'non-negative'}"
                                 f" integer, got {self.knobs[knob]!r}")
        if not self.knobs["tol"] > 0:
            raise ValueError(f"linear_probe.tol must be > 0, got {self.knobs['tol']!r}")

    def _fit(self, x: np.ndarray, y: np.ndarray, c: float):
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, max_iter=self.knobs["max_iter"], tol=self.knobs["tol"]).fit(x, y)

    def setup(self, features: torch.Tensor, labels: torch.Tensor, validation=None) -> None:
        x = features.float().cpu().double().numpy()
        y = labels.cpu().numpy()
        n_classes = len(self.class_ids)
        present = sorted(set(y.tolist()))
        if present != list(range(n_classes)):
            raise ValueError(f"linear probe needs shots of every training class 0..{n_classes - 1}, got {present}")
        if n_classes == 1:
            raise ValueError("linear probe needs at least two classes")
        if self.knobs["C"] == "search":
            if validation is None:
                raise ValueError("linear_probe.C: search chooses C on validation shots, and this run has none; "
                                 "give linear_probe.C a number")
            vx = validation[0].float().cpu().double().numpy()
            vy = validation[1].cpu().numpy()
            fits: dict[float, object] = {}

            def accuracy(c: float) -> float:
                fits[c] = fits.get(c) or self._fit(x, y, c)
                return float((fits[c].predict(vx) == vy).mean())

            self.chosen_c, self.search = search_c(accuracy, self.knobs["search_steps"])
            clf = fits[self.chosen_c]
        else:
            self.chosen_c = float(self.knobs["C"])
            clf = self._fit(x, y, self.chosen_c)
        w, b = torch.from_numpy(clf.coef_).float(), torch.from_numpy(clf.intercept_).float()
        if n_classes == 2:  # sklearn stores one row for two classes: logits (0, w.x + b) give the same softmax
            w, b = torch.cat([torch.zeros_like(w), w]), torch.cat([torch.zeros_like(b), b])
        with torch.no_grad():
            self.weight.copy_(w.to(self.device))
            self.bias.copy_(b.to(self.device))
            self.fitted.fill_(True)

    def extra_meta(self) -> dict:
        return {"C": self.chosen_c, "C_search": [[c, acc] for c, acc in self.search]}

    def load_extra_meta(self, meta: dict) -> None:
        self.chosen_c = meta.get("C")
        self.search = [(c, acc) for c, acc in meta.get("C_search", [])]

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
