"""The spread of the tiny-pretrained recipe: its domain gap over pretraining seeds (and, with ``--styles``, over
the number of pretraining looks), each build measured on held-out twins against the band the recipe promises.

Writes ``docs/figures/tiny_recipe.md`` (and ``.json``) with the machine and package versions beside the numbers;
``--no-write`` only prints. Each build takes about a CPU-minute; ``--jobs 2`` runs two at once.

Run: ``python bench/tiny_recipe.py [--seeds 0 1 2] [--styles 1 1,2 1,2,3,4] [--jobs 2]``. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from common import REPO, emit, machine

from biovlm import environment, standins

FIGURES = REPO / "docs" / "figures" / "tiny_recipe.md"


def build(seed: int, styles: list[int]) -> dict:
    with tempfile.TemporaryDirectory(prefix="biovlm-recipe-") as tmp:
        _, _, info = standins.build_tiny_pretrained({"seed": seed, "styles": styles}, cache_dir=tmp)
    gap = info["gap"]
    return {"seed": seed, "styles": styles, "own": gap["own"], "benchmark": gap["benchmark"], "chance": gap["chance"],
            "seconds": info["seconds"], "band_violations": standins.band_violations(gap)}


def markdown(rows: list[dict], recipe_styles: list[int]) -> str:
    env = environment.describe()
    lines = ["# tiny-pretrained: the recipe's spread", "",
             "Written by `python bench/tiny_recipe.py` (do not edit by hand). Zero-shot accuracy on held-out twins, "
             "mean of the 11 datasets: `own` in the pretraining looks with the pretraining caption, `benchmark` in "
             "the benchmark's look with the hand template. The band every build of the shipped recipe must land in: "
             f"own >= {standins.GAP_BAND['own_min']}, chance + {standins.GAP_BAND['benchmark_above_chance']} <= "
             f"benchmark <= own - {standins.GAP_BAND['benchmark_below_own']} (`biovlm.standins.GAP_BAND`).", "",
             "| pretraining looks | seed | own | benchmark | chance | in band | build s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        looks = ",".join(map(str, r["styles"])) + (" (the recipe)" if r["styles"] == recipe_styles else "")
        lines.append(f"| {looks} | {r['seed']} | {r['own']:.3f} | {r['benchmark']:.3f} | {r['chance']:.3f} | "
                     f"{'yes' if not r['band_violations'] else 'no: ' + '; '.join(r['band_violations'])} | "
                     f"{r['seconds']} |")
    lines += ["", "Per number of looks, mean (min-max) of the benchmark-look zero-shot:", ""]
    for styles in dict.fromkeys(tuple(r["styles"]) for r in rows):
        bench = [r["benchmark"] for r in rows if tuple(r["styles"]) == styles]
        lines.append(f"- {','.join(map(str, styles))}: {np.mean(bench):.3f} ({min(bench):.3f}-{max(bench):.3f})")
    m = env["machine"]
    lines += ["", f"Machine: {m['processor']}, {m['cores']} cores, Python {m['python']}; packages: "
              + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + f"; commit {env['git_commit']}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python bench/tiny_recipe.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="pretraining seeds (default: 0 1 2)")
    ap.add_argument("--styles", nargs="*", default=None,
                    help="pretraining look sets to compare, e.g. 1 1,2 1,2,3,4 (default: the recipe's own)")
    ap.add_argument("--jobs", type=int, default=1, help="builds at once (each uses one thread)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    recipe_styles = list(standins.TINY_PRETRAIN["styles"])
    variants = [[int(s) for s in v.split(",")] for v in args.styles] if args.styles else [recipe_styles]
    tasks = [(seed, styles) for styles in variants for seed in args.seeds]
    with ProcessPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(build, *zip(*tasks, strict=True)))
    text = markdown(rows, recipe_styles)
    print(text)
    if not args.no_write:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(text)
        FIGURES.with_suffix(".json").write_text(json.dumps({"rows": rows, "machine": machine()}, indent=2) + "\n")
        print(f"wrote {FIGURES}")
    figures = {"bench": "tiny_recipe", "rows": rows, "machine": machine()}
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
