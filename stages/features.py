"""DVC stage ``features``: frozen image-tower features of every dataset -> ``features/<dataset>.safetensors``.

One process for all datasets: loading the backbone costs seconds (importing open_clip alone takes about 8 s), which
eleven per-dataset processes would pay eleven times (see the README). Each file holds the test split, the
validation shots and the few-shot pool (union over seeds of ``features.max_shots`` shots per class) under
``features.views`` augmented views per family.
"""

from __future__ import annotations

import time

from biovlm.config import (
    describe_profile,
    feature_path,
    load_config,
    npz_location,
    stage_main,
    stage_parser,
    torch_device,
)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("features", __doc__)
    ap.add_argument("--dataset", action="append", help="only these datasets (default: all in params.yaml)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    datasets = args.dataset or cfg["datasets"]
    unknown = sorted(set(datasets) - set(cfg["datasets"]))
    if unknown:
        raise ValueError(f"{unknown} not in params.yaml datasets ({', '.join(cfg['datasets'])})")
    b, f = cfg["backbone"], cfg["features"]
    print(f"features: {describe_profile(cfg)}; backbone {b['name']}, {cfg['data']['size']} px, {f['views']} views")
    where = {ds: npz_location(cfg, ds) for ds in datasets}
    missing = [str(where[ds].npz.parent) for ds in datasets if not where[ds].npz.exists()]
    if missing:
        raise FileNotFoundError(f"no data in {', '.join(missing)}: run the download stages first (dvc repro)")

    from biovlm.backbone import load_backbone
    from biovlm.features import ViewTransform, extract_features

    t0 = time.perf_counter()
    backbone = load_backbone(b["name"], device=torch_device(cfg), cache_dir=b["cache_dir"])
    print(f"  backbone loaded in {time.perf_counter() - t0:.1f} s on {backbone.device}")
    for ds in datasets:
        t1 = time.perf_counter()
        out = feature_path(ds)
        out.parent.mkdir(parents=True, exist_ok=True)
        extract_features(ds, backbone, root=where[ds].npz.parent, size=cfg["data"]["size"], views=f["views"],
                         seeds=list(cfg["seeds"]), max_shots=f["max_shots"], batch_size=f["batch_size"], out=out,
                         seed=f["seed"], transform=ViewTransform.from_config(f), cache=where[ds].cache)
        print(f"  {ds}: {out} ({out.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t1:.1f} s)")


if __name__ == "__main__":
    stage_main("features", main)
