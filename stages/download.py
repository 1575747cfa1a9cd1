"""DVC stage ``download@<dataset>``: the md5-verified npz of one dataset at ``data.size``.

Paper profile: the official MedMNIST+ file (downloaded through medmnist once; a present file is verified, never
re-downloaded) in ``data/raw/<dataset>/``. ``data.synthetic: true`` (demo): an offline synthetic twin in the
official format in ``data/raw/<dataset>/synthetic/``, regenerated only when its size, counts or seed change.
"""

from __future__ import annotations

import argparse
import json
import time

from biovlm.config import describe_profile, load_config, raw_dir, stage_description, stage_main
from biovlm.data import SYNTHETIC_MANIFEST, ensure_npz, make_synthetic, npz_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m stages.download", description=stage_description(__doc__))
    ap.add_argument("dataset", help="the dataset to download (one of params.yaml datasets)")
    ap.add_argument("--params", default="params.yaml",
                    help="the configuration to run (default: params.yaml, composed from conf/ by dvc exp run)")
    args = ap.parse_args(argv)
    cfg = load_config(args.params)
    if args.dataset not in cfg["datasets"]:
        raise ValueError(f"{args.dataset!r} is not in params.yaml datasets ({', '.join(cfg['datasets'])}); add it "
                         f"there or download one of those")
    data, t0 = cfg["data"], time.perf_counter()
    folder = raw_dir(cfg, args.dataset)
    if data["synthetic"]:
        path = npz_path(args.dataset, data["size"], folder)
        manifest = folder / SYNTHETIC_MANIFEST
        entry = json.loads(manifest.read_text()).get(path.name, {}) if manifest.exists() else {}
        wanted = {"size": data["size"], "seed": data["synthetic_seed"], "counts": data["synthetic_n"]}
        if not path.exists() or {k: entry.get(k) for k in wanted} != wanted:
            make_synthetic(args.dataset, data["size"], data["synthetic_n"], seed=data["synthetic_seed"], root=folder)
        path = ensure_npz(args.dataset, data["size"], folder, download=False)
        what = "synthetic twin"
    else:
        path = ensure_npz(args.dataset, data["size"], folder, download=True)
        what = "official file"
    print(f"download {args.dataset}: {describe_profile(cfg)}; {what} {path} ({path.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    stage_main("download", main)
