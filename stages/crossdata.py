"""DVC stage ``crossdata``: every method's few-shot checkpoints (``crossdata.shots`` shots of each source, from the
``train@<dataset>`` stages) tested on every other dataset -> ``results/crossdata/<method>.csv`` (the in-domain
diagonal is the source's own few-shot test result). Results are kept in the run store by hash, so a rerun
evaluates only what changed. Class-specific methods (the linear probe) have no cross-dataset rows.
"""

from __future__ import annotations

import time
from pathlib import Path

from biovlm.config import (
    describe_profile,
    load_config,
    stage_main,
    stage_parser,
    torch_device,
)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("crossdata", __doc__, "features", "filtered", "checkpoints", "results")
    ap.add_argument("--store", default=None, help="run store folder (default: as the train stages')")
    ap.add_argument("--no-store", action="store_true", help="read the checkpoints folder only")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    cfg = load_config(args.params)
    out = Path(args.results) / "crossdata"
    out.mkdir(parents=True, exist_ok=True)
    if "crossdata" not in cfg["settings"]:
        print("crossdata: not a selected setting; nothing to evaluate")
        return
    print(f"crossdata: {describe_profile(cfg)}; sources {cfg['crossdata']['sources']}, K={cfg['crossdata']['shots']}")

    from biovlm.backbone import load_backbone
    from biovlm.runs import (
        class_specific,
        load_inputs,
        results_frame,
        run_crossdata,
        share_text_features,
        source_states,
    )
    from biovlm.store import RunStore

    inputs = load_inputs(cfg, args.features, args.filtered)
    store = None if args.no_store else RunStore(args.store)
    methods = [m for m in cfg["methods"] if not class_specific(m)]
    states = {m: source_states(m, cfg, inputs, args.checkpoints, store) for m in methods}  # all found before any work
    b = cfg["backbone"]
    backbone = load_backbone(b["name"], device=torch_device(cfg), cache_dir=b["cache_dir"])
    share_text_features(backbone)
    for method in cfg["methods"]:
        rows = [] if method not in states else run_crossdata(method, cfg, backbone, inputs, states[method], store)
        results_frame(rows).to_csv(out / f"{method}.csv", index=False, float_format="%.6g")
        print(f"crossdata {method}: {len(rows)} rows ({time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    stage_main("crossdata", main)
