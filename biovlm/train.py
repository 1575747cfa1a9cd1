"""The training loop: cached image features in, trained method out (the image tower never runs here).

Views. Every image walks through its cached view tuples (plain, weak, strong) in its own random order, one per
epoch: epoch e uses view ``order[i, e mod V]``. With ``features.views`` >= epochs (the paper profile: 100 views,
at most 100 epochs) no image ever sees the same augmentation twice, which is what the public code's fresh
augmentation at every step amounts to; with fewer views each is used once before any repeats. The orders come from
a ``torch.Generator`` seeded with ``seed``, which also shuffles the images and initialises the learned tensors, so
a run is bit-for-bit reproducible on CPU. SGD with momentum; the learning rate is ``warmup_lr`` for
``warmup_epochs`` epochs, then follows a cosine from ``lr`` to 0 over the remaining epochs (stepped per epoch, as in
CoOp's Dassl trainer). On CUDA the loss runs under bf16 autocast.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

TRAIN_DEFAULTS = {"epochs": 50, "lr": 0.002, "momentum": 0.9, "weight_decay": 5e-4, "warmup_epochs": 1,
                  "warmup_lr": 1e-5, "batch_size": 32, "eval_batch_size": 1024, "val_every": 1}
VIEW_KINDS = ("plain", "weak", "strong")

LogFn = Callable[[dict, int], None]


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite during training."""


def train_knobs(cfg: dict | None) -> dict:
    """``cfg["train"]`` over the defaults, validated."""
    given = dict((cfg or {}).get("train") or {})
    unknown = sorted(set(given) - set(TRAIN_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown train knob(s) {unknown}; valid: {sorted(TRAIN_DEFAULTS)}")
    k = {**TRAIN_DEFAULTS, **given}
    for name in ("epochs", "batch_size", "eval_batch_size", "val_every"):
        if isinstance(k[name], bool) or not isinstance(k[name], int) or k[name] < 1:
            raise ValueError(f"train.{name} must be a positive integer, got {k[name]!r}")
    if isinstance(k["warmup_epochs"], bool) or not isinstance(k["warmup_epochs"], int) or k["warmup_epochs"] < 0:
        raise ValueError(f"train.warmup_epochs must be an integer >= 0, got {k['warmup_epochs']!r}")
    for name in ("lr", "momentum", "weight_decay", "warmup_lr"):
        if isinstance(k[name], bool) or not isinstance(k[name], (int, float)) or not k[name] >= 0:
            raise ValueError(f"train.{name} must be a number >= 0, got {k[name]!r}")
    return k


def lr_at(epoch: int, knobs: dict) -> float:
    """Learning rate of a 0-based epoch: constant warm-up, then cosine from lr to 0."""
    warm, total = knobs["warmup_epochs"], knobs["epochs"]
    if epoch < warm:
        return float(knobs["warmup_lr"])
    span = max(1, total - warm)
    return 0.5 * knobs["lr"] * (1 + math.cos(math.pi * (epoch - warm) / span))


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def relabel(labels: torch.Tensor, class_ids: Sequence[int]) -> torch.Tensor:
    """Map original label ids to 0..C-1 in the order of ``class_ids``; a label outside them is an error."""
    lut = {int(c): i for i, c in enumerate(class_ids)}
    bad = sorted({int(v) for v in labels.tolist()} - set(lut))
    if bad:
        raise ValueError(f"training labels {bad} are not among the method's classes {list(class_ids)}")
    return torch.tensor([lut[int(v)] for v in labels.tolist()], dtype=torch.long)


def fit(method, features, positions: Sequence[int] | np.ndarray, cfg: dict | None, seed: int,
        log: LogFn | None = None, val_rows: Sequence[int] | np.ndarray | None = None) -> dict:
    """Train ``method`` on the pool positions ``positions`` of ``features`` (a FeatureSet).

    Returns a history {"epochs": [per-epoch record], "steps": int, "seconds": float}; each record holds the epoch,
    lr, the mean of every loss term, "loss", "acc" (training batches) and "val_acc" (validation shots of the
    method's classes, when there are any; every ``val_every`` epochs and after the last). ``log(record, epoch)``
    is called after every epoch.
    Methods that are not trained by SGD (zero-shot, linear probe) only run ``setup`` and return no epochs.
    """
    knobs = train_knobs(cfg)
    pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
    if pos.numel() == 0:
        raise ValueError("fit needs at least one training position")
    device = method.device
    labels = relabel(features.pool_labels[pos], method.class_ids).to(device)
    clean = features.pool_clean[pos].float().to(device)
    views = {k: features.pool_views[k][pos].float().to(device) for k in VIEW_KINDS if k in features.pool_views}
    if "plain" not in views:
        raise ValueError(f"the feature set has no 'plain' views (has {sorted(features.pool_views)})")
    n_views = views["plain"].shape[1]  # weak and strong view v are augmentations of plain view v's crop

    gen = torch.Generator().manual_seed(int(seed))
    method.reset_parameters(gen)
    val_x, val_y = _val_set(features, method.class_ids, device, val_rows)
    method.setup(clean, labels, None if val_x is None else (val_x, val_y))
    history: dict = {"epochs": [], "steps": 0, "seconds": 0.0}
    if not method.trainable:
        return history

    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=knobs["lr"], momentum=knobs["momentum"], weight_decay=knobs["weight_decay"])
    n, bs = pos.numel(), knobs["batch_size"]
    t0, step = time.perf_counter(), 0
    view_order = torch.argsort(torch.rand(n, n_views, generator=gen), dim=1).to(device)  # a permutation per image
    method.train()
    for epoch in range(knobs["epochs"]):
        lr = lr_at(epoch, knobs)
        for group in opt.param_groups:
            group["lr"] = lr
        sums: dict[str, float] = {}
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            batch = {"labels": labels[idx.to(device)], "clean": clean[idx.to(device)]}
            rows = idx.to(device)
            pick = view_order[rows, epoch % n_views]  # each image's next unseen view tuple
            for kind, v in views.items():
                batch[kind] = v[rows, pick]
            with _autocast(device):
                loss, stats = method.loss(batch)
            _check_finite(method, loss, stats, epoch, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + value * idx.numel()
        record = {"epoch": epoch, "lr": lr, **{k: v / n for k, v in sums.items()}}
        if val_x is not None and ((epoch + 1) % knobs["val_every"] == 0 or epoch + 1 == knobs["epochs"]):
            probs = predict(method, val_x, method.class_names, method.info, method.attributes,
                            batch_size=knobs["eval_batch_size"])
            record["val_acc"] = (probs.argmax(dim=1) == val_y).float().mean().item()
            method.train()
        history["epochs"].append(record)
        if log is not None:
            log(record, epoch)
    method.eval()
    history["steps"], history["seconds"] = step, time.perf_counter() - t0
    return history


def _val_set(features, class_ids: Sequence[int], device,
             rows: Sequence[int] | np.ndarray | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The validation shots (``rows`` of ``features.val_features``: the run's own; default all) of ``class_ids``."""
    x, y = getattr(features, "val_features", None), getattr(features, "val_labels", None)
    if x is None or y is None or len(y) == 0:
        return None, None
    y = torch.as_tensor(y)
    if rows is not None:
        rows = torch.as_tensor(np.asarray(rows, dtype=np.int64))
        x, y = x[rows], y[rows]
    keep = torch.isin(y, torch.tensor(list(class_ids)))
    if not bool(keep.any()):
        return None, None
    return x[keep].float().to(device), relabel(y[keep], class_ids)


def _check_finite(method, loss: torch.Tensor, stats: dict, epoch: int, step: int) -> None:
    if bool(torch.isfinite(loss.detach()).all()):
        return
    bad = [k for k, v in stats.items() if k not in ("loss", "acc") and not math.isfinite(v)] or ["loss"]
    raise NonFiniteLossError(f"{method.name}: loss term(s) {', '.join(repr(b) for b in bad)} became "
                             f"{stats.get(bad[0], float(loss.detach().float()))} at epoch {epoch}, step {step}; "
                             "lower train.lr or the weight of that term")


@torch.no_grad()
def predict(method, image_features: torch.Tensor, class_names: Sequence[str], info,
            attributes: Sequence[Sequence[str]] | None = None, batch_size: int = 1024) -> torch.Tensor:
    """Class probabilities [N, C] (float32, CPU) for any class list, batched, without gradients.

    The text side is computed once per call (``method.text_head``); only the image batches loop.
    """
    was_training = method.training
    method.eval()
    device = method.device
    bs = min(batch_size, getattr(method, "max_predict_batch", batch_size))
    out = []
    with _autocast(device):
        head = method.text_head(list(class_names), info, attributes)
        for start in range(0, image_features.shape[0], bs):
            f = image_features[start:start + bs].float().to(device)
            out.append(method.head_logits(head, f).float().softmax(dim=-1).cpu())
    method.train(was_training)
    if not out:
        return torch.zeros(0, len(class_names))
    return torch.cat(out)


def dvclive_logger(live, prefix: str = "") -> LogFn:
    """A ``log`` callback for ``fit`` that writes every number of an epoch record to a dvclive ``Live``
    (as ``<prefix><name>``) and then advances its step."""

    def log(record: dict, epoch: int) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                live.log_metric(f"{prefix}{key}", float(value))
        live.next_step()

    return log
