"""DVC stage ``train@<method>``: every run of one method (all datasets, settings, shot counts and seeds) from the
cached features -> ``checkpoints/<method>/`` (one file per run, kept between runs: a rerun skips finished runs)
and ``results/<method>.csv`` (one row per setting, source, target, K, seed and part).

Per-epoch training curves of every run go to ``dvclive/<method>/`` (``plots/metrics/<setting>/<dataset>/
k<K>_seed<S>/<term>.tsv``, step = epoch); ``--no-live`` turns that off.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from biovlm.config import (
    CHECKPOINTS_DIR,
    FEATURES_DIR,
    FILTERED_DIR,
    RESULTS_DIR,
    describe_profile,
    load_config,
    stage_main,
    torch_device,
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("method")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--features", default=str(FEATURES_DIR))
    ap.add_argument("--filtered", default=str(FILTERED_DIR))
    ap.add_argument("--checkpoints", default=str(CHECKPOINTS_DIR))
    ap.add_argument("--results", default=str(RESULTS_DIR))
    ap.add_argument("--live", default="dvclive", help="dvclive folder (a subfolder per method)")
    ap.add_argument("--no-live", action="store_true", help="do not log training curves")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(args.params)
    if args.method not in cfg["methods"]:
        raise ValueError(f"method {args.method!r} is not in params.yaml methods ({', '.join(cfg['methods'])})")
    print(f"train {args.method}: {describe_profile(cfg)}; knobs {cfg[args.method]}; train {cfg['train']}")

    from biovlm.backbone import load_backbone
    from biovlm.runs import load_inputs, run_method

    inputs = load_inputs(cfg, args.features, args.filtered)  # every input checked before any training
    b = cfg["backbone"]
    backbone = load_backbone(b["name"], device=torch_device(cfg), cache_dir=b["cache_dir"])
    print(f"  inputs and backbone ready in {time.perf_counter() - t0:.1f} s on {backbone.device}")

    live, log = None, None
    if not args.no_live:
        from dvclive import Live

        # save_dvc_exp/dvcyaml off: DVC runs this stage; dvclive must neither make experiments nor edit dvc.yaml
        live = Live(dir=str(Path(args.live) / args.method), save_dvc_exp=False, dvcyaml=None)

        def log(run_name: str, record: dict, epoch: int) -> None:
            live.step = epoch
            for key, value in record.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    live.log_metric(f"{run_name}/{key}", float(value))

    results = run_method(args.method, cfg, backbone, inputs, Path(args.checkpoints) / args.method, log=log)
    out = Path(args.results) / f"{args.method}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    results.to_csv(out, index=False, float_format="%.6g")
    if live is not None:
        live.end()
    print(f"train {args.method}: {len(results)} rows -> {out} ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    stage_main("train", main)
