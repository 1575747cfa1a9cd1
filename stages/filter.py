"""DVC stage ``filter``: score every attribute on the few-shot pool features with the frozen backbone and write
``data/filtered/<dataset>.json`` (the ``filter.keep`` best per class, plus every attribute's score)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from biovlm import config
from biovlm.attributes import load_attributes
from biovlm.data import get_dataset


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--attributes", default=str(config.ATTRIBUTES_DIR))
    ap.add_argument("--features", default=None, help="folder of <dataset>.safetensors (default: features/)")
    ap.add_argument("--out", default=str(config.FILTERED_DIR))
    args = ap.parse_args(argv)
    cfg = config.load_config(args.params)
    keep, name = cfg["filter"]["keep"], cfg["backbone"]["name"]
    print(f"filter: {config.describe_profile(cfg)}; keep {keep} per class, backbone {name}")

    fdir = Path(args.features) if args.features else None
    fpaths = {ds: fdir / f"{ds}.safetensors" if fdir else config.feature_path(ds) for ds in cfg["datasets"]}
    missing = [str(p) for ds in cfg["datasets"] for p in (Path(args.attributes) / f"{ds}.json", fpaths[ds])
               if not p.exists()]
    if missing:  # before loading the backbone, which takes seconds
        raise FileNotFoundError(f"missing inputs {', '.join(missing)}; run the attributes and features stages")

    from biovlm import backbone, features, filtering  # torch and open_clip: only after the config is valid

    model = backbone.load_backbone(name, device=config.torch_device(cfg), cache_dir=cfg["backbone"]["cache_dir"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in cfg["datasets"]:
        info = get_dataset(ds)
        rec = load_attributes(Path(args.attributes) / f"{ds}.json")
        if rec["classes"] != list(info.prompt_names):
            raise ValueError(f"{args.attributes}/{ds}.json lists classes {rec['classes']}, expected "
                             f"{list(info.prompt_names)}: rerun the attributes stage")
        feats = features.load_features(fpaths[ds], expect={"dataset": ds, "backbone": name})
        result = filtering.filter_attributes(info, rec["attributes"], model, feats, keep)
        (out / f"{ds}.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
        dropped = sum(not r["kept"] for r in result["scores"])
        print(f"  {ds}: kept {keep} of {len(rec['attributes'][0])} per class ({dropped} dropped), "
              f"source {rec['source']}")


if __name__ == "__main__":
    config.stage_main("filter", main)
