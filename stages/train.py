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

import json
import shutil
import time
from pathlib import Path

from biovlm import environment
from biovlm.config import (
    describe_profile,
    load_config,
    stage_main,
    stage_parser,
    torch_device,
)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("train", __doc__, "features", "filtered", "checkpoints", "results")
    ap.add_argument("methods", nargs="*", metavar="method", help="default: every method in params.yaml")
    ap.add_argument("--dataset", action="append", dest="datasets", metavar="DATASET",
                    help="train this dataset's runs (repeatable; default: every dataset in params.yaml)")
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
    from biovlm.executors import make_executor
    from biovlm.runs import check_weights, load_inputs
    from biovlm.store import RunStore

    inputs = load_inputs(cfg, args.features, args.filtered, datasets)  # every input checked before any training
    b = cfg["backbone"]
    executor = make_executor(cfg, inputs, lambda: load_backbone(b["name"], device=torch_device(cfg),
                                                                cache_dir=b["cache_dir"]))
    try:
        print(f"  inputs and backbone ready in {time.perf_counter() - t0:.1f} s on {executor.describe()}")
        identity = executor.identity()
        check_weights(identity["weights_sha256"], b["name"], inputs)
        store = None if args.no_store else RunStore(args.store)
        if store is not None:
            print(f"  run store: {store.root}")
        record = identity["environment"]
        print(f"  environment: {environment.summary_line(record)}")
        for dataset in datasets:
            train_dataset(dataset, args, cfg, {dataset: inputs[dataset]}, executor, store, record, t0)
    finally:
        executor.close()


def train_dataset(dataset: str, args, cfg: dict, inputs: dict, executor, store, record: dict, t0: float) -> None:
    """Every run of every method on ``dataset`` (their pending runs dispatched together), then its files."""
    from biovlm.runs import prune, results_frame, run_files, run_methods, selected_rows

    results_dir = Path(args.results) / dataset
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "environment.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    checkpoints = Path(args.checkpoints) / dataset
    if set(args.methods) == set(cfg["methods"]):  # checkpoints of methods no longer benchmarked
        for stale in sorted(checkpoints.glob("*")):
            if stale.is_dir() and stale.name not in cfg["methods"]:
                shutil.rmtree(stale)
    lives = {}
    if not args.no_live:
        from dvclive import Live

        # DVC runs this stage: dvclive must neither make experiments nor edit dvc.yaml
        lives = {m: Live(dir=str(Path(args.live) / dataset / m), save_dvc_exp=False, dvcyaml=None)
                 for m in args.methods}
    out_dirs = {m: checkpoints / m for m in args.methods}
    states = run_methods(args.methods, cfg, inputs, out_dirs, executor, _live_logger(lives) if lives else None,
                         store=store, datasets=[dataset])
    for method in args.methods:
        prune(out_dirs[method], run_files(out_dirs[method], states[method]))
        out = results_dir / f"{method}.csv"
        out.parent.mkdir(parents=True, exist_ok=True)  # a concurrent `dvc exp run` may have reset it meanwhile
        results = results_frame(selected_rows(cfg, states[method]))
        results.to_csv(out, index=False, float_format="%.6g")
        if method in lives:
            lives[method].end()
        print(f"train {dataset} {method}: {len(results)} rows -> {out} ({time.perf_counter() - t0:.1f} s)")


def _live_logger(lives: dict):
    """Per-run curves of each method: ``<setting>/<dataset>/k<K>_seed<S>/<term>`` with the epoch as step."""

    def log(method: str, run_name: str, record: dict, epoch: int) -> None:
        live = lives[method]
        live.step = epoch
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                live.log_metric(f"{run_name}/{key}", float(value))

    return log


if __name__ == "__main__":
    stage_main("train", main)
