"""Which examples a run sees: the K shots per class for a seed, the validation shots, the base/novel split.

These decide every reported number, so they are pure functions of labels and a seed (no torch, no files) and are
pinned by literal expectations in the tests (`tests/test_sampling.py`) that must hold on any numpy version.
"""

from __future__ import annotations

import math

import numpy as np


def few_shot_indices(labels: np.ndarray, k: int, seed: int,
                     knob: str = "the shot count (fewshot.shots / base2new.shots)") -> np.ndarray:
    """Sorted indices of ``k`` examples per class, deterministic for ``seed`` and nested across ``k``.

    Each class draws one fixed permutation from a generator seeded by ``(seed, class)`` and takes its first ``k``
    entries, so for one seed the 1-shot set lies inside the 2-shot set, ..., inside the 16-shot set, and no class's
    draw depends on another's. ``knob`` names what to lower when a class is too small.
    """
    labels = np.asarray(labels).reshape(-1)
    if k <= 0:
        raise ValueError(f"shots per class must be positive, got k={k}")
    n_classes = int(labels.max()) + 1 if labels.size else 0
    chosen = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if len(members) < k:
            raise ValueError(
                f"class {c} has only {len(members)} examples, fewer than the {k} shots asked for; "
                f"lower {knob}"
            )
        order = np.random.default_rng([seed, c]).permutation(len(members))
        chosen.append(members[order[:k]])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def val_shot_indices(labels: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Validation shots: ``min(k, 4)`` per class from the val split, by the same nested rule."""
    return few_shot_indices(labels, min(k, 4), seed)


def base_novel_split(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Label ids of the base classes (the first ``ceil(n/2)``) and the novel ones (the rest).

    Evaluation relabels each group from 0. This is the published protocol, kept as is; note its consequence for the
    two-class datasets (PneumoniaMNIST, BreastMNIST): base and novel hold one class each, so accuracy on either is
    trivially 100% and reports flag those rows.
    """
    if n_classes < 2:
        raise ValueError(f"a base/novel split needs at least 2 classes, got {n_classes}")
    n_base = math.ceil(n_classes / 2)
    return np.arange(n_base), np.arange(n_base, n_classes)
