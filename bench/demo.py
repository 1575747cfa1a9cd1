"""The demo's figures: ``dvc exp run -S profile=demo`` end to end in a fresh copy of the repository, timed, and
the accuracies it produced, written to ``docs/figures/demo.md`` (and ``.json``) and to the README's demo table.

The files git knows (tracked, plus untracked ones that are not ignored: the working tree as it would be committed)
are copied to a temporary folder, which becomes a new git repository with one commit; there the demo runs every
stage (synthetic twins, attributes, features, filter, training of every method, evaluation, report) with the
copy's own ``biovlm`` package first on ``PYTHONPATH`` and empty caches (``BIOVLM_CACHE``, ``HF_HOME``), as on a new
machine. Per-stage times are the intervals between DVC's "Running stage" lines. The figures file names the machine,
the package versions and the commit beside the numbers; ``--no-write`` only prints.

Run: ``python bench/demo.py``. The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pandas as pd
from common import REPO, copy_checkout, emit, machine, replace_block

from biovlm import data, environment, learning_checks

STAGE_LINE = re.compile(r"Running stage '([^']+)'")
FIGURES = REPO / "docs" / "figures" / "demo.md"


def git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", *args], cwd=cwd,
                   check=True, capture_output=True)


def run_demo(work: Path, env: dict, command: list[str]) -> tuple[float, list[tuple[str, float]], int, list[str]]:
    """Run the DVC command, echoing its output; returns (seconds, [(stage, start offset)], exit code, lines)."""
    t0 = time.perf_counter()
    starts: list[tuple[str, float]] = []
    lines: list[str] = []
    proc = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        now = time.perf_counter() - t0
        line = line.rstrip()
        lines.append(line)
        print(f"  [{now:6.1f} s] {line}", flush=True)
        if m := STAGE_LINE.search(line):
            starts.append((m.group(1), now))
    code = proc.wait()
    return time.perf_counter() - t0, starts, code, lines


def demo_accuracy(metrics: Path) -> dict:
    """Per method, the dataset-average accuracy (mean over seeds) at each K, base-to-novel HM and cross-dataset
    transfer, in percent, from the demo's metrics files; ``chance`` is the mean chance level of the 11 datasets."""
    fewshot = json.loads((metrics / "detail" / "fewshot.json").read_text())
    summary = json.loads((metrics / "summary.json").read_text())
    out: dict = {"chance": round(100 * sum(1 / i.n_classes for i in data.DATASETS.values()) / len(data.DATASETS), 1)}
    for method, per_k in fewshot.items():
        row = {k: round(v["average"]["accuracy"]["mean"], 1) for k, v in per_k.items()}
        for setting in ("base2new", "crossdata"):
            if method in summary.get(setting, {}):
                row[setting] = round(summary[setting][method], 1)
        out[method] = row
    return out


def demo_learning(results: Path) -> dict[str, bool]:
    """The demo's promise (``biovlm.learning_checks``), from the per-seed, per-dataset rows of every results table
    (``results/<dataset>/*.csv``, ``results/crossdata/*.csv``)."""
    rows = pd.concat([pd.read_csv(path) for path in sorted(results.rglob("*.csv"))], ignore_index=True)
    means = learning_checks.seed_means(rows)
    return learning_checks.learning_checks(means, learning_checks.chance_levels(rows.target.unique()))


def figures_markdown(fig: dict, short: bool = False) -> str:
    """The accuracy table (and, unless ``short``, timings and environment) as markdown."""
    acc = fig["accuracy"]
    ks = [k for k in next(v for m, v in acc.items() if m != "chance") if k.startswith("k")]
    head = ["method", *(f"few-shot K={k[1:]}" for k in ks), "base-to-novel HM", "cross-dataset"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, row in acc.items():
        if method == "chance":
            continue
        cells = [row.get(k, "n/a") for k in ks] + [row.get("base2new", "n/a"), row.get("crossdata", "n/a")]
        lines.append(f"| {method} | " + " | ".join(str(c) for c in cells) + " |")
    env = fig["environment"]
    note = (f"Accuracy in %, mean of the 11 synthetic twins and the demo's seeds (chance {acc['chance']}). "
            f"`dvc exp run -S profile=demo` took {fig['seconds']:.0f} s on {env['machine']['processor']} "
            f"({env['machine']['cores']} cores), commit {env['git_commit'][:12]}.")
    if short:
        return "\n".join([*lines, "", note])
    stages = ", ".join(f"{k} {v} s" for k, v in fig["stage_groups_s"].items())
    versions = ", ".join(f"{k} {v}" for k, v in env["packages"].items())
    checks = "\n".join(f"- {'met' if ok else '**not met**'}: {c}" for c, ok in fig["learning"].items())
    return "\n".join([
        "# Demo figures", "", "Written by `python bench/demo.py` (do not edit by hand): the offline demo profile run "
        "end to end through DVC in a fresh copy of the repository, with empty caches.", "", *lines, "", note, "",
        "## What the demo must show", "", checks, "", "## Time per stage", "", stages, "", "## Environment", "",
        f"- machine: {env['machine']['processor']}, {env['machine']['cores']} cores, Python "
        f"{env['machine']['python']}, {env['machine']['platform']}", f"- packages: {versions}",
        f"- commit: {env['git_commit']}", ""])


def write_figures(fig: dict) -> None:
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    FIGURES.write_text(figures_markdown(fig))
    FIGURES.with_suffix(".json").write_text(json.dumps(fig, indent=2) + "\n")
    replace_block(REPO / "README.md", "demo-figures", figures_markdown(fig, short=True))
    print(f"wrote {FIGURES}, {FIGURES.with_suffix('.json')} and the README's demo table")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print the figures only (no docs/README update)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--target-s", type=float, default=300.0)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="biovlm-demo-"))
    cache = Path(tempfile.mkdtemp(prefix="biovlm-cache-"))
    try:
        n = copy_checkout(work)
        git("init", "-q", cwd=work)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "bench copy", cwd=work)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))}
        env.update(BIOVLM_CACHE=str(cache / "biovlm"), HF_HOME=str(cache / "hf"))
        command = ["dvc", "exp", "run", "-S", "profile=demo"]
        print(f"copied {n} files to {work}; running `{' '.join(command)}` (empty caches)", flush=True)
        seconds, starts, code, lines = run_demo(work, env, command)
        if code != 0:
            raise RuntimeError(f"`{' '.join(command)}` failed with exit code {code}; output above (copy: {work})")
        stages = {}
        for i, (stage, start) in enumerate(starts):
            end = starts[i + 1][1] if i + 1 < len(starts) else seconds
            stages[stage] = round(end - start, 1)
        groups: dict[str, float] = {}
        for stage, s in stages.items():
            groups[stage.split("@")[0]] = round(groups.get(stage.split("@")[0], 0.0) + s, 1)
        print("per stage (s): " + ", ".join(f"{k} {v}" for k, v in stages.items()))
        met = seconds <= args.target_s
        print(f"demo profile end to end: {seconds:.1f} s ({seconds / 60:.1f} min; target <= {args.target_s:g} s: "
              f"{'met' if met else 'NOT met'})")
        accuracy = demo_accuracy(work / "metrics")
        checks = demo_learning(work / "results")
        for check, ok in checks.items():
            print(f"{'met' if ok else 'NOT MET'}: {check}")
        figures = {"bench": "demo", "seconds": round(seconds, 1), "target_s": args.target_s, "met": met,
                   "stages_s": stages, "stage_groups_s": groups, "accuracy": accuracy, "learning": checks,
                   "environment": {**environment.describe(), "git_commit": environment.git_commit(REPO)},
                   "machine": machine()}
        if not args.no_write:
            write_figures(figures)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
