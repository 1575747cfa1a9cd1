"""DVC stage ``filter``: the confidence table of every dataset -> ``data/filtered/<dataset>.json``: the cosine of
every few-shot pool image (clean features) with every attribute text and every class's mean attribute text.

The expensive part of confidence filtering, done once. Each run selects its own ``filter.keep`` attributes per
class from this table and its own training shots only (``biovlm.filtering``), in the train stage.
"""

from __future__ import annotations

from pathlib import Path

from biovlm import config
from biovlm.attributes import load_attributes


def main(argv: list[str] | None = None) -> None:
    ap = config.stage_parser("filter", __doc__)
    ap.add_argument("--attributes", default=str(config.ATTRIBUTES_DIR), help="folder of <dataset>.json attributes")
    ap.add_argument("--features", default=None, help="folder of <dataset>.safetensors (default: features/)")
    ap.add_argument("--out", default=str(config.FILTERED_DIR), help="output folder of the confidence tables")
    args = ap.parse_args(argv)
    cfg = config.load_config(args.params)
    name = cfg["backbone"]["name"]
    print(f"filter: {config.describe_profile(cfg)}; confidence tables with backbone {name}")

    fdir = Path(args.features) if args.features else None
    fpaths = {ds: fdir / f"{ds}.safetensors" if fdir else config.feature_path(ds) for ds in cfg["datasets"]}
    missing = [str(p) for ds in cfg["datasets"] for p in (Path(args.attributes) / f"{ds}.json", fpaths[ds])
               if not p.exists()]
    if missing:  # before loading the backbone, which takes seconds
        raise FileNotFoundError(f"missing inputs {', '.join(missing)}; run the attributes and features stages")

    from biovlm import backbone, filtering, runs  # torch and open_clip: only after the config is valid

    model = backbone.load_backbone(name, device=config.torch_device(cfg), cache_dir=cfg["backbone"]["cache_dir"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds in cfg["datasets"]:
        info = config.dataset_info(cfg, ds)
        rec = load_attributes(Path(args.attributes) / f"{ds}.json")
        if rec["classes"] != list(info.prompt_names):
            raise ValueError(f"{args.attributes}/{ds}.json lists classes {rec['classes']}, expected "
                             f"{list(info.prompt_names)}: rerun the attributes stage")
        feats = runs.load_feature_file(cfg, ds, fpaths[ds], model.fingerprint)  # every field, not just the name
        table = filtering.build_table(info, rec["attributes"], model, feats)
        filtering.save_table(table, out / f"{ds}.json")
        p, c, n = table.similarity.shape
        print(f"  {ds}: {p} pool images x {c} classes x {n} attributes, source {rec['source']}")


if __name__ == "__main__":
    config.stage_main("filter", main)
