"""Experiments side by side, in a table that fits a terminal: ``python -m biovlm.compare [EXPERIMENT ...]``.

``dvc exp show`` prints one column per key of ``params.yaml`` and per dependency of every stage (DVC's choice, not
a setting), too many for a terminal. This prints the transpose of the part that matters: one column per
experiment, one row per knob whose value differs between them, then one row per headline number (the DVC metric
``metrics/summary.json``: setting x method). It reads ``dvc exp show --json``, so it shows exactly what DVC recorded.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from biovlm.config import flatten, stage_description
from biovlm.methods import display_name
from biovlm.plots import NA, SYNTHETIC_MARK

PARAMS_FILE = "params.yaml"
METRICS_FILE = "metrics/summary.json"
# The headline of each setting (biovlm.evaluate.summary_metrics): accuracy at the largest K; the harmonic mean of
# base and novel accuracy; accuracy on the datasets a run was not trained on.
SETTING_TITLES = {"fewshot": "few-shot, largest K (%)", "base2new": "base-to-novel HM (%)",
                  "crossdata": "cross-dataset (%)"}
NOT_RUN = "-"  # an experiment without headline numbers (a commit whose pipeline never ran)
MAX_VALUE_WIDTH = 24  # a longer knob value (a list of datasets) is cut with an ellipsis


@dataclass
class Experiment:
    """One row of ``dvc exp show``: the workspace, a commit or an experiment."""

    name: str
    rev: str
    kind: str  # "workspace", "commit" or "experiment"
    params: dict[str, Any]  # params.yaml, flattened to dotted keys
    metrics: dict[str, dict[str, float]]  # setting -> method -> headline number


def _experiment(entry: dict, kind: str) -> Experiment:
    data = entry.get("data") or {}
    params = ((data.get("params") or {}).get(PARAMS_FILE) or {}).get("data") or {}
    metrics = ((data.get("metrics") or {}).get(METRICS_FILE) or {}).get("data") or {}
    name = entry.get("name") or (entry["rev"] if kind == "workspace" else entry["rev"][:7])
    return Experiment(name=name, rev=entry["rev"], kind=kind, params=flatten(params), metrics=metrics)


def experiments_from_json(entries: list[dict]) -> list[Experiment]:
    """``dvc exp show --json`` -> the workspace, each baseline commit and its experiments, in DVC's order."""
    out = []
    for entry in entries:
        out.append(_experiment(entry, "workspace" if entry["rev"] == "workspace" else "commit"))
        for group in entry.get("experiments") or []:
            out.extend(_experiment(rev, "experiment") for rev in group.get("revs") or [])
    return out


def select(experiments: list[Experiment], names: list[str]) -> list[Experiment]:
    """The experiments named (by name or the start of their commit), or by default every experiment (the workspace
    when there is none yet)."""
    if not names:
        chosen = [e for e in experiments if e.kind == "experiment"]
        return chosen or [e for e in experiments if e.kind == "workspace"]
    chosen = []
    for name in names:
        match = [e for e in experiments if e.name == name or (len(name) >= 4 and e.rev.startswith(name))]
        if not match:
            known = ", ".join(e.name for e in experiments)
            raise ValueError(f"no experiment named {name!r}; known: {known} (see `dvc exp show`)")
        chosen.append(match[0])
    return chosen


def _text(value: Any) -> str:
    text = value if isinstance(value, str) and value else json.dumps(value)  # an empty string shows as ""
    return text if len(text) <= MAX_VALUE_WIDTH else text[: MAX_VALUE_WIDTH - 1] + "…"


def differing_knobs(experiments: list[Experiment]) -> list[str]:
    """Keys of params.yaml whose value is not the same in every experiment (a key one of them lacks counts)."""
    keys = list(dict.fromkeys(k for e in experiments for k in e.params))
    missing = object()
    return [k for k in keys if len({json.dumps(e.params.get(k, missing), default=str) for e in experiments}) > 1]


def table(experiments: list[Experiment], knobs: list[str] | None = None) -> str:
    """The comparison as aligned text: a column per experiment, a row per differing knob and per headline number.
    ``n/a``: the method has no number in that setting (the linear probe has no novel classes); ``-``: the
    experiment has no headline numbers at all. The data row says SYNTHETIC DATA for the demo's synthetic twins."""
    knobs = differing_knobs(experiments) if knobs is None else knobs
    rows: list[tuple[str, list[str]]] = [("  data", [SYNTHETIC_MARK if e.params.get("data.synthetic") else "MedMNIST+"
                                                     for e in experiments])]
    if len(experiments) > 1:
        rows.append(("knobs that differ" if knobs else "knobs: all the same", []))
        rows += [(f"  {k}", [_text(e.params.get(k, "-")) for e in experiments]) for k in knobs]
    else:
        rows.append((f"  profile ({len(experiments[0].params)} knobs in params.yaml)",
                     [_text(experiments[0].params.get("profile", "-"))]))
    for setting, title in SETTING_TITLES.items():
        methods = list(dict.fromkeys(m for e in experiments for m in (e.metrics.get(setting) or {})))
        if not methods:
            continue
        rows.append((title, []))
        for method in methods:
            cells = [(e.metrics.get(setting) or {}).get(method) for e in experiments]
            cells = [f"{v:.1f}" if v is not None else NA if e.metrics else NOT_RUN
                     for v, e in zip(cells, experiments, strict=True)]
            rows.append((f"  {display_name(method)}", cells))
    if not any(e.metrics for e in experiments):
        rows.append(("no headline numbers yet (run `dvc exp run -S profile=demo`)", []))
    blank = [""] * len(experiments)  # a section title: a row without values
    frame = pd.DataFrame([cells or blank for _, cells in rows], index=[label for label, _ in rows],
                         columns=[e.name for e in experiments])
    return "\n".join(line.rstrip() for line in frame.to_string().splitlines())


def dvc_exp_show(repo: Path) -> list[dict]:
    """``dvc exp show --json`` in ``repo``, parsed."""
    try:
        done = subprocess.run(["dvc", "exp", "show", "--json"], cwd=repo, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise RuntimeError("dvc is not installed in this environment; install the project (see the README)") from err
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise RuntimeError(f"`dvc exp show --json` failed in {repo}: {last}")
    return json.loads(done.stdout)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m biovlm.compare",
                                 description=stage_description(__doc__.split("\n\n", 1)[1]))
    ap.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                    help="experiment names or commit prefixes, as `dvc exp show` lists them (default: every "
                         "experiment of the current commit; `workspace` and the branch name work too)")
    ap.add_argument("--repo", default=".", help="the project's git clone (default: the current folder)")
    ap.add_argument("--from-json", metavar="FILE",
                    help="read a saved `dvc exp show --json` output instead of running DVC")
    args = ap.parse_args(argv)
    try:
        entries = json.loads(Path(args.from_json).read_text()) if args.from_json else dvc_exp_show(Path(args.repo))
        chosen = select(experiments_from_json(entries), args.experiments)
    except (RuntimeError, ValueError, OSError) as err:
        sys.exit(f"compare: {err}")
    print(table(chosen))


if __name__ == "__main__":
    main()
