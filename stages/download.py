"""DVC stage ``download@<dataset>``: the md5-verified npz of one dataset at ``data.size``.

Paper profile: the official MedMNIST+ file in ``<data.root>/<dataset>/`` (downloaded through medmnist once; a present
file is verified, never re-downloaded), or one already in medmnist's own flat layout, ``<data.root>/<name>_<size>.npz``
(e.g. ``data.root: ~/.medmnist``), verified and read in place: ``data/raw/<dataset>/``, this stage's DVC output, then
holds ``IN_PLACE.json`` (which file, its md5) and later the file's extracted arrays. When the file is missing and
cannot be downloaded (``BIOVLM_OFFLINE=1``, or the download fails) the error lists every file the configured datasets
lack, with URLs and sizes. ``data.synthetic: true`` (demo): an offline synthetic twin in the official format in
``data/raw/<dataset>/synthetic/``, regenerated only when its size, counts or seed change.
"""

from __future__ import annotations

import json
import time

from biovlm.config import describe_profile, load_config, raw_dir, stage_main, stage_parser
from biovlm.data import (
    RAW_DIR,
    SYNTHETIC_MANIFEST,
    ensure_npz,
    ensure_official,
    expected_md5,
    make_synthetic,
    npz_path,
)

IN_PLACE_RECORD = "IN_PLACE.json"


def main(argv: list[str] | None = None) -> None:
    ap = stage_parser("download", __doc__)
    ap.add_argument("dataset", help="the dataset to download (one of params.yaml datasets)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    if args.dataset not in cfg["datasets"]:
        raise ValueError(f"{args.dataset!r} is not in params.yaml datasets ({', '.join(cfg['datasets'])}); add it "
                         f"there or download one of those")
    data, t0 = cfg["data"], time.perf_counter()
    if data["synthetic"]:
        folder = raw_dir(cfg, args.dataset)
        path = npz_path(args.dataset, data["size"], folder)
        manifest = folder / SYNTHETIC_MANIFEST
        entry = json.loads(manifest.read_text()).get(path.name, {}) if manifest.exists() else {}
        wanted = {"size": data["size"], "seed": data["synthetic_seed"], "counts": data["synthetic_n"]}
        if not path.exists() or {k: entry.get(k) for k in wanted} != wanted:
            make_synthetic(args.dataset, data["size"], data["synthetic_n"], seed=data["synthetic_seed"], root=folder)
        path = ensure_npz(args.dataset, data["size"], folder, download=False)
        what = "synthetic twin"
    else:
        where = ensure_official(args.dataset, data["size"], data["root"], cfg["datasets"])
        path, what = where.npz, "official file"
        record = RAW_DIR / args.dataset / IN_PLACE_RECORD
        if where.in_place:
            # this stage's DVC output, which must exist; the record says which file its extracted arrays come from
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"file": str(path), "bytes": path.stat().st_size,
                                          "md5": expected_md5(args.dataset, data["size"], path)[0]}, indent=1) + "\n")
            what = f"official file, read in place (arrays extracted into {where.cache}/.extracted/),"
        else:
            record.unlink(missing_ok=True)  # a file in the dataset's folder now takes precedence
    print(f"download {args.dataset}: {describe_profile(cfg)}; {what} {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    stage_main("download", main)
