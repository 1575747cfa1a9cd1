"""DVC stage ``evaluate``: the results tables (``results/<dataset>/<method>.csv``,
``results/crossdata/<method>.csv``) -> the DVC metric ``metrics/summary.json`` (the headline: one number per setting
and method), the full tables ``metrics/detail/{fewshot,base2new,crossdata}.json`` (every K, dataset, metric, mean
and std) and the plot data ``metrics/plots/fewshot_curve.csv`` and ``metrics/plots/crossdata.csv``.

Only the headline is a DVC metric, so ``dvc exp show`` and ``dvc metrics diff`` stay a short list; the detail is in
the report and in these files."""

from __future__ import annotations

import json
from pathlib import Path

from biovlm.config import METRICS_DIR, load_config, results_files, stage_main, stage_parser
from biovlm.evaluate import (
    base2new_metrics,
    check_finite,
    crossdata_matrix,
    crossdata_metrics,
    fewshot_curve,
    fewshot_metrics,
    load_results,
    summary_metrics,
)


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("evaluate", __doc__, "results")
    ap.add_argument("--out", default=str(METRICS_DIR),
                    help="folder of the metrics and plot data (default: %(default)s)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    methods, datasets = cfg["methods"], cfg["datasets"]
    df = load_results(results_files(args.results, cfg))
    out = Path(args.out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    metrics = {"fewshot": fewshot_metrics(df, methods, datasets), "base2new": base2new_metrics(df, methods, datasets),
               "crossdata": crossdata_metrics(df, methods, datasets)}
    metrics["summary"] = summary_metrics(metrics["fewshot"], metrics["base2new"], metrics["crossdata"])
    (out / "detail").mkdir(parents=True, exist_ok=True)
    for name, values in metrics.items():
        check_finite(values, name)
        where = out if name == "summary" else out / "detail"
        (where / f"{name}.json").write_text(json.dumps(values, indent=1) + "\n")
    # the `data` column lets `dvc plots show` mark figures drawn from synthetic twins (the .dvc/plots templates)
    data = "synthetic" if cfg["data"]["synthetic"] else "official"
    fewshot_curve(df, methods).assign(data=data).to_csv(out / "plots" / "fewshot_curve.csv", index=False)
    crossdata_matrix(df, methods, datasets).assign(data=data).to_csv(out / "plots" / "crossdata.csv", index=False)
    print(json.dumps(metrics["summary"], indent=1))


if __name__ == "__main__":
    stage_main("evaluate", main)
