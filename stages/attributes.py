"""DVC stage ``attributes``: write ``data/attributes/<dataset>.json`` for every dataset in params.yaml.

``llm.source`` picks them: ``reference`` (the paper's published files, downloaded once into ``$BIOVLM_CACHE`` and
sha256-checked), ``curated`` (shipped, offline) or ``llm`` (``llm.model`` queried through the committed response
cache ``llm.cache_dir``; OPENAI_API_KEY / OPENAI_BASE_URL needed only on cache misses). The class names in the
records (and in every prompt) are those of ``data.class_names``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from biovlm.attributes import build_records, install_log_redaction
from biovlm.config import ATTRIBUTES_DIR, describe_profile, load_config, stage_main, stage_parser


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("attributes", __doc__)
    ap.add_argument("--out", default=str(ATTRIBUTES_DIR),
                    help="folder of the per-dataset attribute files (default: %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for name in ("httpx", "httpx2", "httpcore"):  # one line per request, holding the URL: not worth a log
        logging.getLogger(name).setLevel(logging.WARNING)
    install_log_redaction(logging.getLogger().handlers)
    cfg = load_config(args.params)
    llm = cfg["llm"]
    source = llm.get("source") or ("llm" if llm["model"] else "curated")
    names = cfg["data"].get("class_names", "medmnist")
    print(f"attributes: {describe_profile(cfg)}; source: {llm['model'] if source == 'llm' else source}; "
          f"class names: {names}")
    records = build_records(cfg["datasets"], llm, names)  # every error is a ValueError/RuntimeError: see stage_main
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for ds, rec in records.items():
        (out / f"{ds}.json").write_text(json.dumps(rec, indent=2, ensure_ascii=False) + "\n")
        print(f"  {ds}: {len(rec['attributes'])} classes x {len(rec['attributes'][0])} attributes ({rec['source']})")


if __name__ == "__main__":
    stage_main("attributes", main)
