"""Hand-made mutations of the code that produces reported numbers, each of which a fast test must kill.

Each mutation replaces one piece of source text in a temporary copy of the checkout (the checkout itself is never
touched) and runs the fast tests of the module it breaks; a mutation is killed when a test fails. These are the
mutations a review found surviving (the mutation-testing issue's table) plus a few of the same kind; mutmut
(`bench/mutation.py`) covers the mechanical ones.

Writes ``docs/figures/hand_mutations.md`` (and ``.json``); ``--no-write`` only prints. Takes a few minutes.

Run: ``python bench/hand_mutations.py [--only NAME ...]``. The last line is JSON; the exit status is 1 when a
mutation survives.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, copy_checkout, emit, replace_block

FIGURES = REPO / "docs" / "figures" / "hand_mutations.md"

# (name, file, text to replace, replacement, the test files (space-separated) that must catch it)
MUTATIONS = [
    ("ECE with 10 bins instead of 15", "biovlm/evaluate.py", "ECE_BINS = 15", "ECE_BINS = 10",
     "tests/test_evaluate.py"),
    ("ECE bins include their lower edge", "biovlm/evaluate.py",
     "bins = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)",
     "bins = np.clip(np.floor(conf * n_bins).astype(int), 0, n_bins - 1)", "tests/test_evaluate.py"),
    ("ECE not multiplied by 100", "biovlm/evaluate.py",
     '"ece": 100.0 * expected_calibration_error(probs, labels)', '"ece": expected_calibration_error(probs, labels)',
     "tests/test_evaluate.py"),
    ("fit skips the warm-up epoch", "biovlm/train.py", "lr = lr_at(epoch, knobs)",
     'lr = lr_at(max(epoch, knobs["warmup_epochs"]), knobs)', "tests/test_train.py"),
    ("the filter's own class is among the competing classes", "biovlm/filtering.py",
     "others = [j for j in class_ids if j != c]", "others = list(class_ids)", "tests/test_filtering.py"),
    ("the report bolds the maximum for every metric", "biovlm/report.py",
     "target = row.max() if higher else row.min()", "target = row.max()", "tests/test_report.py"),
    ("CLIP-Adapter's alpha and 1 - alpha swapped", "biovlm/methods/clip_adapter.py",
     "a * self.adapter(f) + (1 - a) * f", "(1 - a) * self.adapter(f) + a * f", "tests/test_methods.py"),
    ("label remapping reversed in evaluate_part", "biovlm/runs.py",
     "lut[class_ids] = np.arange(len(class_ids))", "lut[class_ids] = np.arange(len(class_ids))[::-1]",
     "tests/test_runs.py tests/test_pipeline.py"),
    ("is_static always true", "biovlm/runs.py", "return not cls.trainable and cls.setup is Method.setup",
     "return True", "tests/test_runs.py tests/test_pipeline.py"),
    ("KgCoOp's weight ignored", "biovlm/methods/kgcoop.py", 'total = total + self.knobs["weight"] * kg',
     "total = total + kg", "tests/test_methods.py"),
    ("BiomedCoOp's teacher ignores outlier pruning", "biovlm/methods/biomedcoop.py",
     'keep = prune_mask(logits.max(dim=-1).values.mean(dim=-1), self.knobs["prune_z"])',
     "keep = torch.ones(classifiers.shape[0], dtype=torch.bool)",
     "tests/test_methods.py"),
    ("few-shot draws stop being nested over K", "biovlm/sampling.py",
     "order = np.random.default_rng([seed, c]).permutation(len(members))",
     "order = np.random.default_rng([seed, c, k]).permutation(len(members))", "tests/test_sampling.py"),
    ("base/novel split takes floor(n/2) base classes", "biovlm/sampling.py",
     "n_base = math.ceil(n_classes / 2)", "n_base = n_classes // 2", "tests/test_sampling.py"),
    ("the average HM is the mean of per-dataset HMs", "biovlm/evaluate.py",
     "hm = harmonic_mean(parts[\"base\"][\"accuracy\"][\"mean\"], parts[\"novel\"][\"accuracy\"][\"mean\"])",
     "hm = per_seed_hm.mean()", "tests/test_evaluate.py"),
    ("std over seeds with ddof=1", "biovlm/evaluate.py", '"std": round(float(values.std(ddof=0)), 4)',
     '"std": round(float(values.std(ddof=1)), 4)', "tests/test_evaluate.py"),
]


def apply(root: Path, file: str, old: str, new: str) -> None:
    path = root / file
    text = path.read_text()
    if text.count(old) != 1:
        raise SystemExit(f"{file}: expected exactly one {old!r} (found {text.count(old)}); update MUTATIONS in "
                         f"{Path(__file__).name} to the current code")
    path.write_text(text.replace(old, new))


def try_mutation(name: str, file: str, old: str, new: str, tests: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="biovlm-mutation-") as tmp:
        root = Path(tmp)
        copy_checkout(root)
        (root / "params.yaml").write_text(subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=REPO,
                                                         capture_output=True, text=True, check=True).stdout)
        apply(root, file, old, new)
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-m", "not slow", "-p", "no:cacheprovider",
                               *tests.split()], cwd=root, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(root)})
        seconds = time.perf_counter() - start
    failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
    return {"name": name, "file": file, "tests": tests, "killed": proc.returncode == 1,
            "killed_by": failed[0] if failed else None, "returncode": proc.returncode, "seconds": round(seconds, 1)}


def markdown(rows: list[dict], page: bool = True) -> str:
    """The figures as a page (``page``) or as the table block of docs/testing.md."""
    from mutation import machine_line

    lines = ["# Hand-made mutations", ""] if page else []
    lines += ["Written by `python bench/hand_mutations.py` (do not edit by hand). Each mutation is applied alone to a "
              "copy of the checkout and the fast tests of its module are run; the first failing test is shown.", "",
              "| mutation | file | killed | by |", "|---|---|---|---|"]
    for r in rows:
        verdict = "yes" if r["killed"] else ("**no**" if r["returncode"] == 0 else f"error (rc {r['returncode']})")
        lines.append(f"| {r['name']} | `{r['file']}` | {verdict} | `{r['killed_by'] or '-'}` |")
    lines += ["", machine_line(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/hand_mutations.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run only the mutations whose name contains NAME")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not write {FIGURES.relative_to(REPO)}")
    args = ap.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(s in m[0] for s in args.only)]
    rows = []
    for mutation in chosen:
        rows.append(try_mutation(*mutation))
        r = rows[-1]
        print(f"{'killed  ' if r['killed'] else 'SURVIVED'} {r['name']} ({r['seconds']} s) {r['killed_by'] or ''}",
              flush=True)
    text = markdown(rows)
    print(text)
    if not args.no_write and not args.only:
        FIGURES.write_text(text)
        replace_block(REPO / "docs" / "testing.md", "hand-mutations", markdown(rows, page=False))
        FIGURES.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    emit({"mutations": len(rows), "killed": sum(r["killed"] for r in rows)})
    return 0 if all(r["killed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
