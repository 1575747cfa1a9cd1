"""DVC stage ``train@<dataset>``: every few-shot and base-to-novel run of every method on one dataset (its shot
counts and seeds) from the cached features -> ``checkpoints/<dataset>/<method>/`` (one file per run, kept between
executions) and ``results/<dataset>/<method>.csv`` (one row per setting, K, seed and part). Every result is also kept
in the run store (``biovlm/store.py``), which outlives DVC's restored outputs: a rerun redoes only the runs whose
inputs changed. The cross-dataset evaluation is the ``crossdata`` stage, after every dataset's.

Without ``--dataset`` every configured dataset is trained in this one process (the backbone loaded once); name
methods to train only those. Per-epoch training curves go to ``dvclive/<dataset>/<method>/``
(``plots/metrics/<setting>/<dataset>/k<K>_seed<S>/<term>.tsv``, step = epoch); ``--no-live`` turns that off.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from biovlm import environment
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
    ap = argparse.ArgumentParser(prog="python -m stages.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("methods", nargs="*", metavar="method", help="default: every method in params.yaml")
    ap.add_argument("--dataset", action="append", dest="datasets", metavar="DATASET",
                    help="train this dataset's runs (repeatable; default: every dataset in params.yaml)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--features", default=str(FEATURES_DIR))
    ap.add_argument("--filtered", default=str(FILTERED_DIR))
    ap.add_argument("--checkpoints", default=str(CHECKPOINTS_DIR))
    ap.add_argument("--results", default=str(RESULTS_DIR))
    ap.add_argument("--live", default="dvclive", help="dvclive folder (a subfolder per dataset and method)")
    ap.add_argument("--no-live", action="store_true", help="do not log training curves")
    ap.add_argument("--store", default=None, help="run store folder (default: $BIOVLM_RUN_STORE, else "
                                                  "<repository>/.biovlm/runs; see biovlm/store.py)")
    ap.add_argument("--no-store", action="store_true", help="keep results in the checkpoints folder only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(args.params)
    args.methods = args.methods or list(cfg["methods"])
    unknown = [m for m in args.methods if m not in cfg["methods"]]
    if unknown:
        raise ValueError(f"method(s) {unknown} not in params.yaml methods ({', '.join(cfg['methods'])})")
    datasets = args.datasets or list(cfg["datasets"])
    unknown = [d for d in datasets if d not in cfg["datasets"]]
    if unknown:
        raise ValueError(f"dataset(s) {unknown} not in params.yaml datasets ({', '.join(cfg['datasets'])})")
    print(f"train {' '.join(datasets)}: {' '.join(args.methods)}; {describe_profile(cfg)}")

    from biovlm.backbone import load_backbone
    from biovlm.runs import load_inputs, run_method
    from biovlm.store import RunStore

    inputs = load_inputs(cfg, args.features, args.filtered, datasets)  # every input checked before any training
    b = cfg["backbone"]
    backbone = load_backbone(b["name"], device=torch_device(cfg), cache_dir=b["cache_dir"])
    print(f"  inputs and backbone ready in {time.perf_counter() - t0:.1f} s on {backbone.device}")
    check_weights(backbone, inputs)
    store = None if args.no_store else RunStore(args.store)
    if store is not None:
        print(f"  run store: {store.root}")
    record = environment.describe(str(backbone.device), backbone)
    print(f"  environment: {environment.summary_line(record)}")
    for dataset in datasets:
        results_dir = Path(args.results) / dataset
        results_dir.mkdir(parents=True, exist_ok=True)
        (results_dir / "environment.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        checkpoints = Path(args.checkpoints) / dataset
        if set(args.methods) == set(cfg["methods"]):  # checkpoints of methods no longer benchmarked
            for stale in sorted(checkpoints.glob("*")):
                if stale.is_dir() and stale.name not in cfg["methods"]:
                    shutil.rmtree(stale)
        for method in args.methods:
            live, log = None, None
            if not args.no_live:
                from dvclive import Live

                # DVC runs this stage: dvclive must neither make experiments nor edit dvc.yaml
                live = Live(dir=str(Path(args.live) / dataset / method), save_dvc_exp=False, dvcyaml=None)
                log = _live_logger(live)
            results = run_method(method, cfg, backbone, inputs, checkpoints / method, log=log, store=store,
                                 datasets=[dataset], crossdata=False)
            out = results_dir / f"{method}.csv"
            out.parent.mkdir(parents=True, exist_ok=True)  # a concurrent `dvc exp run` may have reset it meanwhile
            results.to_csv(out, index=False, float_format="%.6g")
            if live is not None:
                live.end()
            print(f"train {dataset} {method}: {len(results)} rows -> {out} ({time.perf_counter() - t0:.1f} s)")


def check_weights(backbone, inputs: dict) -> None:
    """Refuse features that another set of weights made (another machine's download, a half-loaded model)."""
    from biovlm.runs import InputError

    for name, item in inputs.items():
        made_by = item.features.meta.get("weights_sha256")
        if made_by != backbone.fingerprint:
            raise InputError(f"features of {name} were made by weights with sha256 {made_by}, but the loaded "
                             f"{backbone.name} has {backbone.fingerprint}: rerun the features stage (dvc repro)")


def _live_logger(live):
    """Per-run curves: ``<setting>/<dataset>/k<K>_seed<S>/<term>`` with the epoch as step."""

    def log(run_name: str, record: dict, epoch: int) -> None:
        live.step = epoch
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                live.log_metric(f"{run_name}/{key}", float(value))

    return log


if __name__ == "__main__":
    stage_main("train", main)
