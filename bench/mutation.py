"""Mutation testing of the modules that produce numbers: runs mutmut, then prints the share of mutants the fast
tests kill, per module, against the project's targets.

mutmut (``pip install -c requirements/constraints.txt -e '.[dev,mutation]'``) mutates the modules listed under
``[tool.mutmut] only_mutate`` in ``pyproject.toml`` and runs, for each mutant, the fast tests that reach the mutated
function. A mutant the tests do not notice ("survived") is a change to the code that would change a reported number
(or a message) unseen. Results are cached in ``mutants/`` (git-ignored): a rerun only tests what changed.

Writes ``docs/figures/mutation.md`` (and ``.json``) with the machine and package versions beside the figures;
``--no-run`` only reads the last run's results, ``--retest-survivors`` tests the cached survivors again (after new
tests: mutmut retests a mutant only when its function changes), ``--no-write`` only prints, ``--survivors`` lists
every mutant that survived (``mutmut show <name>`` prints its diff).

Run: ``python bench/mutation.py [--no-run] [--survivors]``. The last line is JSON; the exit status is 1 when a
target is missed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from common import REPO, emit, replace_block

FIGURES = REPO / "docs" / "figures" / "mutation.md"

# Share of mutants killed that each module must reach (the first matching prefix wins).
TARGETS = {
    "biovlm/evaluate.py": 0.95,
    "biovlm/routing.py": 0.95,
    "biovlm/methods/": 0.95,
    "biovlm/": 0.90,
}


def target_for(module: str) -> float:
    return next(t for prefix, t in TARGETS.items() if module.startswith(prefix))


def status_of(exit_code: int | None) -> str:
    """mutmut's verdict for a mutant's exit code (its own table, ``mutmut.stats.status_by_exit_code``)."""
    from mutmut.stats import status_by_exit_code

    return status_by_exit_code[exit_code]


def collect(root: Path = REPO) -> dict[str, Counter]:
    """Verdict counts per mutated module, from mutmut's ``mutants/**/*.py.meta`` files."""
    counts: dict[str, Counter] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        module = meta.relative_to(root / "mutants").as_posix().removesuffix(".meta")
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        if verdicts:
            counts[module] = Counter(status_of(code) for code in verdicts.values())
    return counts


def survivors(root: Path = REPO) -> list[str]:
    names = []
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        verdicts = json.loads(meta.read_text())["exit_code_by_key"]
        names += [name for name, code in verdicts.items() if status_of(code) != "killed"]
    return names


def reset_survivors(root: Path = REPO) -> int:
    """Forget the cached verdict of every mutant that survived, so the next run tests it again: mutmut retests a
    mutant when its function changes, not when the tests do."""
    reset = 0
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        verdicts = data["exit_code_by_key"]
        for name, code in verdicts.items():
            if code is not None and status_of(code) == "survived":
                verdicts[name] = None
                reset += 1
        meta.write_text(json.dumps(data))
    return reset


def summarise(counts: dict[str, Counter]) -> list[dict]:
    rows = []
    for module, c in counts.items():
        total = sum(c.values())
        rate = c["killed"] / total if total else 1.0
        rows.append({"module": module, "mutants": total, "killed": c["killed"],
                     "survived": c["survived"], "other": total - c["killed"] - c["survived"],
                     "not_checked": c["not checked"],
                     "rate": round(rate, 4), "target": target_for(module), "met": rate >= target_for(module)})
    return rows


def markdown(rows: list[dict], full_run: dict | None, machine_line: str, page: bool = True) -> str:
    """The figures as a page (``page``) or as the table block of docs/testing.md; ``full_run``: the time, mutant
    count and commit of the last run from an empty ``mutants/`` (a later incremental run keeps it)."""
    lines = ["# Mutation testing", ""] if page else []
    lines += ["Written by `python bench/mutation.py` (do not edit by hand). Mutants of each module (mutmut "
              "3.8.1, the fast tests: `-m 'not slow'`), how many the tests kill, and the project's target. "
              "`other` counts mutants that timed out, that no test reaches, or that are not checked yet (an "
              "interrupted run; they count as not killed).", "",
              "| module | mutants | killed | survived | other | killed % | target % | met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['module']}` | {r['mutants']} | {r['killed']} | {r['survived']} | {r['other']} | "
                     f"{100 * r['rate']:.1f} | {100 * r['target']:.0f} | {'yes' if r['met'] else '**no**'} |")
    total = sum(r["mutants"] for r in rows)
    killed = sum(r["killed"] for r in rows)
    lines += [f"| all | {total} | {killed} | {sum(r['survived'] for r in rows)} | {sum(r['other'] for r in rows)} "
              f"| {100 * killed / max(total, 1):.1f} | | |", ""]
    unchecked = sum(r.get("not_checked", 0) for r in rows)
    if unchecked:
        lines.append(f"An interrupted run: {unchecked} mutants not checked yet (counted in `other`).")
    if full_run:
        lines.append(f"The last run from an empty `mutants/` ({full_run['mutants']} mutants, commit "
                     f"{full_run['commit'][:12]}): {full_run['seconds'] / 60:.1f} minutes.")
    lines += ["", machine_line, ""]
    return "\n".join(lines)


def machine_line(env: dict | None = None) -> str:
    """The machine, packages and commit of ``env`` (default: ``biovlm.environment.describe()`` now)."""
    from biovlm import environment

    env = env or environment.describe()
    m = env["machine"]
    return (f"Machine: {m['processor']}, {m['cores']} cores, Python {m['python']}; packages: "
            + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + f"; commit {env['git_commit']}.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/mutation.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-run", action="store_true", help="only read the results of the last `mutmut run`")
    ap.add_argument("--fresh", action="store_true", help="delete mutants/ first (a full run; its time is recorded)")
    ap.add_argument("--retest-survivors", action="store_true",
                    help="test the cached survivors again (after adding tests: mutmut only retests changed code)")
    ap.add_argument("--no-write", action="store_true", help=f"print only; do not write {FIGURES.relative_to(REPO)}")
    ap.add_argument("--survivors", action="store_true", help="list every mutant the tests did not kill")
    args = ap.parse_args(argv)

    full_run = None
    if not args.no_run:
        if args.fresh:
            subprocess.run(["rm", "-rf", str(REPO / "mutants")], check=True)
        elif args.retest_survivors:
            print(f"{reset_survivors()} survivors will be tested again", flush=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mutmut", "run"], cwd=REPO, check=True)
        seconds = time.perf_counter() - start
    rows = summarise(collect())
    if not rows:
        sys.exit("no mutmut results in mutants/: run without --no-run first")
    from biovlm import environment

    env = environment.describe()  # before this script writes its figures (the commit would read as dirty)
    machine = machine_line(env)
    previous = FIGURES.with_suffix(".json")
    if not args.no_run and args.fresh:
        full_run = {"seconds": round(seconds, 1), "mutants": sum(r["mutants"] for r in rows),
                    "commit": env["git_commit"]}
    elif previous.exists():
        full_run = json.loads(previous.read_text()).get("full_run")
    if args.survivors:
        print("\n".join(survivors()))
    text = markdown(rows, full_run, machine)
    print(text)
    if not args.no_write:
        FIGURES.parent.mkdir(parents=True, exist_ok=True)
        FIGURES.write_text(text)
        replace_block(REPO / "docs" / "testing.md", "mutation-figures", markdown(rows, full_run, machine, False))
        previous.write_text(json.dumps({"rows": rows, "full_run": full_run}, indent=1) + "\n")
    emit({"rows": rows, "full_run": full_run})
    return 0 if all(r["met"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
