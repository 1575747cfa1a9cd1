"""DVC stage ``report``: paper-layout tables (``report/report.md``, ``report/tables.tex``) and figures
(``report/figures/*.png``) from the results tables of every dataset and method (``results/<dataset>/<method>.csv``,
``results/crossdata/<method>.csv``)."""

from __future__ import annotations

import json
from pathlib import Path

from biovlm import environment
from biovlm.config import REPORT_DIR, load_config, results_files, stage_main, stage_parser
from biovlm.evaluate import load_results
from biovlm.report import write_report


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("report", __doc__, "results")
    ap.add_argument("--out", default=str(REPORT_DIR),
                    help="folder of the report, tables and figures (default: %(default)s)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    df = load_results(results_files(args.results, cfg))
    data = f"{cfg['data']['size']} px " + ("synthetic twins" if cfg["data"]["synthetic"] else "MedMNIST+")
    header = (f"Configuration: profile `{cfg['_profile']}`; backbone `{cfg['backbone']['name']}`, {data}, "
              f"seeds {cfg['seeds']}, {cfg['train']['epochs']} epochs (see params.yaml and dvc.lock).")
    env_file = Path(args.results) / cfg["datasets"][0] / "environment.json"  # the train stages write one each
    if env_file.exists():
        header += "\n\nEnvironment: " + environment.summary_line(json.loads(env_file.read_text())) + "."
    paths = write_report(df, args.out, cfg["methods"], cfg["datasets"], header=header,
                         synthetic=cfg["data"]["synthetic"])
    print("report: " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    stage_main("report", main)
