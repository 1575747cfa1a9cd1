"""Projected time of the full paper profile on the machine at hand, from measured per-unit costs.

Measured here with ``biomedclip-random`` (BiomedCLIP's exact architecture; random weights cost the same):
- image tower throughput (224-px uint8 images -> features, preprocessing included),
- for every method of params.yaml and two class counts (breastmnist: 2 classes, organamnist: 11): one training step
  (the method's ``loss`` + backward + SGD step on a batch of cached features, as ``biovlm.train.fit`` runs it) and
  the prediction cost (the class-list part paid once per ``predict`` call, and the per-image part), linearly
  interpolated in the number of classes for the other datasets.
Counted from params.yaml's paper profile (``biovlm.plan.plan_runs`` gives the runs): feature encodings per dataset
(test split + validation shots + few-shot pool x (1 clean + 3 families x views), from the official split sizes in
``biovlm.data.DATASETS``), training steps per run (epochs x ceil(K x classes / batch)), the per-epoch validation
predictions, and the test predictions of the few-shot, base-to-novel and cross-dataset settings.

On a CUDA GPU everything is measured there (bf16 autocast, as the pipeline runs). Not counted: process start-up and
model loading per stage (seconds each), data download and extraction, attribute querying (cached), the filter stage
(one pass over the pool features), report. Run: ``python bench/paper_estimate.py``. The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

from common import REPO, device_name, emit, machine, median, replace_block, sync

FIGURES = REPO / "docs" / "figures" / "paper_estimate.md"

SMALL, LARGE = "breastmnist", "organamnist"  # 2 and 11 classes: the interpolation points


def _batch(backbone, n: int, n_classes: int, seed: int = 0) -> dict:
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)

    def feats():
        return F.normalize(torch.randn(n, backbone.embed_dim, generator=g), dim=-1).to(backbone.device)

    return {"labels": (torch.arange(n) % n_classes).to(backbone.device), "clean": feats(), "plain": feats(),
            "weak": feats(), "strong": feats()}


def _median_time(fn, repeats: int, device: str, min_seconds: float = 2.0, max_runs: int = 20) -> float:
    """Median seconds of ``fn`` after one untimed call: at least ``repeats`` runs, more (up to ``max_runs``)
    until ``min_seconds`` have been spent, so that sub-second costs are not one noisy sample."""
    fn()
    sync(device)
    times: list[float] = []
    while len(times) < repeats or (sum(times) < min_seconds and len(times) < max_runs):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return median(times)


def measure_method(name: str, backbone, cfg: dict, dataset: str, batch_size: int, repeats: int) -> dict:
    """Seconds of one training step, of the class-list part of a prediction, and per predicted image."""
    import torch

    from biovlm import attributes as attrs
    from biovlm import data
    from biovlm.config import method_config
    from biovlm.methods import build_method
    from biovlm.train import _autocast, predict

    info = data.get_dataset(dataset)
    keep = cfg["filter"]["keep"]
    attributes = [a[:keep] for a in attrs.curated(dataset)]
    mcfg = method_config(cfg, name)
    if "ctx_init" in mcfg[name]:  # the stand-in's vocabulary splits "a photo of a" into 8 tokens; the cost is that
        mcfg[name] = {**mcfg[name], "ctx_init": ""}  # of n_ctx context tokens either way
    method = build_method(name, backbone, mcfg, info, attributes=attributes)
    batch = _batch(backbone, batch_size, info.n_classes)
    device = backbone.device.type
    out = {"classes": info.n_classes}
    method.setup(batch["clean"], batch["labels"], (batch["plain"], batch["labels"]))  # validation: the C search
    if method.trainable:
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

        def step() -> None:
            method.train()
            with _autocast(backbone.device):
                loss, _ = method.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        out["step_s"] = _median_time(step, repeats, device)  # after one untimed step (fills the text caches)
    method.eval()
    names, attributes = list(method.class_names), method.attributes
    n = getattr(method, "max_predict_batch", 256)
    one, many = batch["plain"][:1], _batch(backbone, n, info.n_classes, seed=1)["plain"]
    t_one = _median_time(lambda: predict(method, one, names, info, attributes), repeats, device)
    t_many = _median_time(lambda: predict(method, many, names, info, attributes), repeats, device)
    out["per_image_s"] = max(0.0, (t_many - t_one) / (n - 1))
    out["head_s"] = max(0.0, t_one - out["per_image_s"])
    print(f"  {name:13s} {dataset:12s} C={info.n_classes:2d}: "
          + (f"step {out['step_s']:.3f} s, " if "step_s" in out else "")
          + f"prediction {out['head_s']:.3f} s per call + {out['per_image_s'] * 1e3:.3f} ms per image", flush=True)
    return out


def interpolate(costs: dict, key: str, n_classes: int) -> float:
    """Cost at ``n_classes`` on the line through the two measured class counts (never below 0)."""
    lo, hi = costs[SMALL], costs[LARGE]
    if key not in lo:
        return 0.0
    slope = (hi[key] - lo[key]) / (hi["classes"] - lo["classes"])
    return max(0.0, lo[key] + slope * (n_classes - lo["classes"]))


def feature_encodings(cfg: dict) -> dict[str, int]:
    """Images through the image tower per dataset: test split, validation shots and pool x (1 + 3 x views)."""
    from biovlm import data

    seeds, k, views = len(cfg["seeds"]), cfg["features"]["max_shots"], cfg["features"]["views"]
    out = {}
    for ds in cfg["datasets"]:
        info = data.get_dataset(ds)
        c, n = info.n_classes, info.n_samples
        pool = min(n["train"], c * k * seeds)  # union over seeds of the k-shot sets (at most)
        val = min(n["val"], c * min(k, 4) * seeds)
        out[ds] = n["test"] + val + pool * (1 + 3 * views)
    return out


def project(cfg: dict, costs: dict[str, dict]) -> dict:
    """Seconds per method for training (steps + per-epoch validation) and evaluation, from the run plan."""
    from biovlm import data
    from biovlm.config import crossdata_sources, method_config
    from biovlm.plan import plan_runs

    seeds, k = len(cfg["seeds"]), cfg["features"]["max_shots"]
    infos = {ds: data.get_dataset(ds) for ds in cfg["datasets"]}

    def n_test(ds: str, classes: int) -> float:
        return infos[ds].n_samples["test"] * classes / infos[ds].n_classes  # classes are near balanced in count

    def predict_s(m: str, ds: str, classes: int, images: float) -> float:
        c = costs[m]
        return interpolate(c, "head_s", classes) + images * interpolate(c, "per_image_s", classes)

    result = {}
    for m in cfg["methods"]:
        steps = train_s = val_s = eval_s = 0.0
        runs = plan_runs(cfg)
        for run in runs:
            schedule = method_config(cfg, m, run.setting, run.dataset)["train"]  # shared < method's < per-run
            bs, epochs = schedule["batch_size"], schedule["epochs"]
            c = infos[run.dataset].n_classes
            parts = [c] if run.setting == "fewshot" else [math.ceil(c / 2), c - math.ceil(c / 2)]
            train_c = parts[0]
            if "step_s" in costs[m][SMALL] and train_c > 1:
                n_steps = epochs * math.ceil(run.shots * train_c / bs)
                steps += n_steps
                train_s += n_steps * interpolate(costs[m], "step_s", train_c)
                n_val = min(infos[run.dataset].n_samples["val"], c * min(k, 4) * seeds) * train_c / c
                val_s += epochs * predict_s(m, run.dataset, train_c, n_val)
            for i, part in enumerate(parts):
                if part > 1 and not (i == 1 and m == "linear_probe"):
                    eval_s += predict_s(m, run.dataset, part, n_test(run.dataset, part))
        if "crossdata" in cfg["settings"] and m != "linear_probe":
            for src in crossdata_sources(cfg):
                for tgt in cfg["datasets"]:
                    if tgt != src:
                        eval_s += seeds * predict_s(m, tgt, infos[tgt].n_classes, n_test(tgt, infos[tgt].n_classes))
        result[m] = {"runs": len(runs), "steps": int(steps), "train_h": train_s / 3600,
                     "validation_h": val_s / 3600, "evaluation_h": eval_s / 3600}
    return result


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default=str(REPO / "params.yaml"))
    ap.add_argument("--backbone", default="biomedclip-random")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--methods", nargs="*", default=None, help="measure only these (default: params.yaml methods)")
    ap.add_argument("--repeats", type=int, default=1, help="timed training steps per method and class count")
    ap.add_argument("--tower-batches", type=int, default=2)
    ap.add_argument("--tower-batch-size", type=int, default=32)
    ap.add_argument("--images-per-s", type=float, default=None,
                    help="use this image-tower throughput instead of measuring it (e.g. from bench/features.py)")
    args = ap.parse_args(argv)

    import features as feature_bench

    from biovlm.backbone import load_backbone
    from biovlm.config import load_config, method_config

    cfg = load_config(args.params, {"profile": "paper"})
    if args.methods:
        cfg["methods"] = [m for m in cfg["methods"] if m in args.methods]
    device = device_name(args.device)
    print(f"paper profile: {len(cfg['datasets'])} datasets, methods {', '.join(cfg['methods'])}, seeds "
          f"{cfg['seeds']}, shots {cfg['fewshot']['shots']}, {cfg['train']['epochs']} epochs, batch "
          f"{cfg['train']['batch_size']}, {cfg['features']['views']} views, settings {', '.join(cfg['settings'])}; "
          f"measured with {args.backbone} on {device}")

    if args.images_per_s:
        images_per_s, tower = args.images_per_s, {"given": True}
    else:
        tower = feature_bench.tower_throughput(args.backbone, args.tower_batches, args.tower_batch_size, device)
        images_per_s = tower["with_preprocessing_images_per_s"]
    encodings = feature_encodings(cfg)
    feature_h = sum(encodings.values()) / images_per_s / 3600
    print(f"features: {sum(encodings.values()):,} image encodings at {images_per_s:.2f} images/s -> "
          f"{feature_h:.1f} h")

    backbone = load_backbone(args.backbone, device=device)
    costs: dict[str, dict] = defaultdict(dict)
    for m in cfg["methods"]:
        for ds in (SMALL, LARGE):
            bs = method_config(cfg, m)["train"]["batch_size"]
            costs[m][ds] = measure_method(m, backbone, cfg, ds, bs, args.repeats)
    per_method = project(cfg, costs)

    print(f"{'method':13s} {'runs':>5s} {'steps':>8s} {'train h':>9s} {'val h':>8s} {'eval h':>8s}")
    for m, r in per_method.items():
        print(f"{m:13s} {r['runs']:5d} {r['steps']:8d} {r['train_h']:9.2f} {r['validation_h']:8.2f} "
              f"{r['evaluation_h']:8.2f}")
    train_h = sum(r["train_h"] + r["validation_h"] + r["evaluation_h"] for r in per_method.values())
    total = feature_h + train_h
    print(f"projected paper profile on this machine: features {feature_h:.1f} h + training and evaluation "
          f"{train_h:.1f} h = {total:.1f} h ({total / 24:.1f} days)")
    rounded = {m: {k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}
               for m, r in per_method.items()}
    figures = {"bench": "paper_estimate", "backbone": args.backbone, "device": device,
               "image_tower_images_per_s": round(images_per_s, 3), "feature_encodings": sum(encodings.values()),
               "features_h": round(feature_h, 2), "train_eval_h": round(train_h, 2), "total_h": round(total, 2),
               "per_method": rounded,
               "unit_costs": {m: {ds: {k: round(v, 5) for k, v in c.items()} for ds, c in v.items()}
                              for m, v in costs.items()},
               "tower": {k: round(v, 3) if isinstance(v, float) else v for k, v in tower.items()},
               "machine": machine()}
    emit(figures)
    FIGURES.write_text(figures_markdown(figures, cfg))
    FIGURES.with_suffix(".json").write_text(json.dumps(figures, indent=2) + "\n")
    top = sorted(per_method.items(), key=lambda kv: -sum(v for k, v in kv[1].items() if k.endswith("_h")))[:3]
    replace_block(REPO / "docs" / "performance.md", "paper-estimate",
                  f"{total:,.0f} h ({total / 24:.0f} days): features {feature_h:.0f} h "
                  f"({sum(encodings.values()):,} image encodings at {images_per_s:.2f} images/s), training and "
                  f"evaluation {train_h:.0f} h, most of it "
                  + ", ".join(f"{m} {sum(v for k, v in r.items() if k.endswith('_h')):.0f} h" for m, r in top)
                  + f" (load average {figures['machine']['loadavg_1min']} when measured).")
    return figures


def figures_markdown(fig: dict, cfg: dict) -> str:
    m = fig["machine"]
    rows = [f"| {name} | {r['runs']} | {r['steps']:,} | {r['train_h']:.2f} | {r['validation_h']:.2f} | "
            f"{r['evaluation_h']:.2f} |" for name, r in fig["per_method"].items()]
    return "\n".join([
        "# Projected paper-profile time", "",
        "<!-- written by `python bench/paper_estimate.py`; rerun it to refresh -->", "",
        f"The published setup (params.yaml's top level: {len(cfg['datasets'])} datasets, {len(cfg['seeds'])} seeds, "
        f"K = {', '.join(map(str, cfg['fewshot']['shots']))}, {cfg['features']['views']} views, each method's "
        f"published schedule) projected from unit costs measured with `{fig['backbone']}` (BiomedCLIP's "
        f"architecture) on `{fig['device']}`:", "",
        f"- features: {fig['feature_encodings']:,} image encodings at {fig['image_tower_images_per_s']} images/s: "
        f"**{fig['features_h']:.1f} h**",
        f"- training and evaluation: **{fig['train_eval_h']:.1f} h**",
        f"- total: **{fig['total_h']:.1f} h** ({fig['total_h'] / 24:.1f} days)", "",
        "| method | runs | steps | train h | validation h | evaluation h |", "|---|---|---|---|---|---|", *rows, "",
        f"Machine: {m.get('cpu')}, {m.get('cores')} cores, Python {m.get('python')}; "
        + ", ".join(f"{k} {v}" for k, v in (m.get("packages") or {}).items())
        + f"; load average {m.get('loadavg_1min')} when measured.", ""])


if __name__ == "__main__":
    main()
