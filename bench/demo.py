"""Wall time of the whole demo profile through DVC, end to end, in a fresh copy of the repository.

The files git knows (tracked, plus untracked ones that are not ignored: the working tree as it would be committed)
are copied to a temporary folder, which becomes a new git repository with one commit; there
``dvc exp run -S profile=demo`` runs every stage (synthetic twins, attributes, features, filter, training of every
method, evaluation, report) with the copy's own ``biovlm`` package first on ``PYTHONPATH``. By default the backbone
cache (``BIOVLM_CACHE``) is a fresh empty folder, so the time includes the one-time offline pretraining of the
``tiny-pretrained`` backbone, as a first run on a new machine would; ``--warm-cache`` uses the existing cache.
Per-stage times are the intervals between DVC's "Running stage" lines.

Run: ``python bench/demo.py``. The last output line is JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from common import REPO, emit, machine

STAGE_LINE = re.compile(r"Running stage '([^']+)'")


def copy_repo(dest: Path) -> int:
    """Copy the files git would commit (tracked + untracked, not ignored) into ``dest``; returns the count."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f]
    n = 0
    for rel in files:
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        n += 1
    return n


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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--warm-cache", action="store_true", help="reuse the existing backbone cache (BIOVLM_CACHE)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary copy (its path is printed)")
    ap.add_argument("--target-s", type=float, default=300.0)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="biovlm-demo-"))
    cache = Path(tempfile.mkdtemp(prefix="biovlm-cache-"))
    try:
        n = copy_repo(work)
        git("init", "-q", cwd=work)
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", "bench copy", cwd=work)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")]))}
        if not args.warm_cache:
            env["BIOVLM_CACHE"] = str(cache)
        command = ["dvc", "exp", "run", "-S", "profile=demo"]
        print(f"copied {n} files to {work}; running `{' '.join(command)}` "
              f"({'existing' if args.warm_cache else 'empty'} backbone cache)", flush=True)
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
        figures = {"bench": "demo", "seconds": round(seconds, 1), "target_s": args.target_s, "met": met,
                   "cold_backbone_cache": not args.warm_cache, "stages_s": stages, "stage_groups_s": groups,
                   "machine": machine()}
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
