"""Scaling of the train stages over executors: runs per second on this machine with the local executor and with 1 and
2 Ray workers, and the projected wall time of the paper grid on N workers, written to ``docs/figures/scaling.md``
(and ``.json``) and the README's scaling block.

Workload: the demo profile's inputs (synthetic twins, tiny-pretrained backbone), made by the real download,
attributes, features and filter stages in a temporary folder, then every pending run of ``--methods`` on every demo
dataset through ``biovlm.runs.run_methods``, once per executor, each from an empty checkpoint folder and no run
store. Start-up (Ray, the workers' backbones) is timed apart from the runs.

Projection: the paper grid's per-method costs come from ``docs/figures/paper_estimate.json`` (``bench/
paper_estimate.py``: measured on BiomedCLIP's architecture, on the device named there). On N workers the features
(one stage per dataset, not spread) take their time, and training and evaluation take their total / (N x the
efficiency measured here with 2 workers), but never less than the longest single run. Run:
``python bench/scaling.py``. The last output line is JSON.
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

from common import REPO, emit, machine, replace_block

FIGURES = REPO / "docs" / "figures" / "scaling.md"
ESTIMATE = REPO / "docs" / "figures" / "paper_estimate.json"
WORKERS = (1, 2, 4, 8, 16)


def prepare(work: Path) -> dict:
    """The demo's inputs, by the real stages, in ``work``; returns the demo configuration."""
    from biovlm.config import compose_text, load_config

    params = work / "params.yaml"
    params.write_text(compose_text("demo", REPO / "conf"))  # what `dvc exp run -S profile=demo` writes
    cfg = load_config(params)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    commands = [["download", ds] for ds in cfg["datasets"]] + [["attributes"], ["features"], ["filter"]]
    for stage, *args in commands:
        subprocess.run([sys.executable, "-m", f"stages.{stage}", *args], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL)
    return cfg


def measure(name: str, make, cfg: dict, inputs: dict, methods: list[str], out: Path) -> dict:
    """Start-up and run time of one executor on every run of ``methods`` (none reused)."""
    from biovlm.runs import run_methods

    t0 = time.perf_counter()
    executor = make()
    startup = time.perf_counter() - t0
    try:
        t0 = time.perf_counter()
        states = run_methods(methods, cfg, inputs, {m: out / name / m for m in methods}, executor,
                             echo=lambda line: None)
        seconds = time.perf_counter() - t0
    finally:
        executor.close()
    n = sum(len(s) for s in states.values())
    print(f"  {name}: {n} runs in {seconds:.1f} s ({n / seconds:.2f} runs/s), start-up {startup:.1f} s", flush=True)
    return {"executor": name, "runs": n, "seconds": round(seconds, 2), "runs_per_s": round(n / seconds, 3),
            "startup_s": round(startup, 1)}


def project(estimate: dict, efficiency: float) -> list[dict]:
    """Projected paper-grid hours on N workers of the device ``estimate`` was measured on."""
    longest = max((m["train_h"] + m["validation_h"] + m["evaluation_h"]) / max(m["runs"], 1)
                  for m in estimate["per_method"].values())
    rows = []
    for n in WORKERS:
        spread = estimate["train_eval_h"] / (n * (efficiency if n > 1 else 1.0))
        rows.append({"workers": n, "train_eval_h": round(max(spread, longest), 1),
                     "total_h": round(estimate["features_h"] + max(spread, longest), 1)})
    return rows


def figures_markdown(fig: dict) -> str:
    rows = "\n".join(f"| {r['executor']} | {r['runs']} | {r['seconds']:.1f} | {r['runs_per_s']:.2f} | "
                     f"{r['startup_s']:.1f} |" for r in fig["measured"])
    proj = "\n".join(f"| {r['workers']} | {r['train_eval_h']:.1f} | {r['total_h']:.1f} |" for r in fig["projected"])
    m, est = fig["machine"], fig["estimate"]
    return f"""Measured by `python bench/scaling.py` on {m['cpu']} ({m['cores']} cores, load {m['loadavg_1min']} at the
start), Python {m['python']}, torch {m['packages']['torch']}, ray {fig['ray']}: the demo's runs of
{', '.join(fig['methods'])} on {', '.join(fig['datasets'])} (tiny-pretrained, CPU), from scratch with each executor.

| executor | runs | seconds | runs/s | start-up s |
|---|---|---|---|---|
{rows}

Speed-up with 2 Ray workers over 1: {fig['speedup_2']:.2f}x (efficiency {fig['efficiency_2']:.2f}).

Projected paper grid on N workers of the kind `bench/paper_estimate.py` measured ({est['device']}, backbone
{est['backbone']}; features {est['features_h']:.1f} h, not spread; training and evaluation {est['train_eval_h']:.1f} h
on one worker, spread at the efficiency above):

| workers | training + evaluation h | total h |
|---|---|---|
{proj}
"""


def readme_markdown(fig: dict) -> str:
    local, one, two = fig["measured"]
    proj = " · ".join(f"{r['workers']}: {r['total_h']:.0f} h" for r in fig["projected"])
    return (f"Demo runs on this 2-core machine (`python bench/scaling.py`): {local['runs_per_s']:.2f} runs/s local, "
            f"{one['runs_per_s']:.2f} with 1 Ray worker, {two['runs_per_s']:.2f} with 2 ({fig['speedup_2']:.2f}x). "
            f"Paper grid projected on N workers of the kind measured by `bench/paper_estimate.py` "
            f"({fig['estimate']['device']}): {proj}.")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="*", default=["coop", "kgcoop", "biovlm"])
    ap.add_argument("--no-write", action="store_true", help="print the figures only")
    args = ap.parse_args(argv)

    import ray
    import torch

    from biovlm.backbone import load_backbone
    from biovlm.executors import ExecutorSettings, LocalExecutor, RayExecutor
    from biovlm.runs import load_inputs

    info = machine()
    with tempfile.TemporaryDirectory(prefix="biovlm-scaling-") as tmp:
        work = Path(tmp)
        print("preparing the demo's inputs ...", flush=True)
        cfg = prepare(work)
        inputs = load_inputs(cfg, work / "features", work / "data" / "filtered")
        b = cfg["backbone"]
        torch.set_num_threads(int(b["threads"] or 1))
        backbone = load_backbone(b["name"], device="cpu", cache_dir=b["cache_dir"])
        measured = [measure("local", lambda: LocalExecutor(cfg, backbone, inputs), cfg, inputs, args.methods, work)]
        for n in (1, 2):
            settings = ExecutorSettings(kind="ray", workers=n, cpus_per_worker=1)
            measured.append(measure(f"ray, {n} worker{'s' * (n > 1)}",
                                    lambda s=settings: RayExecutor(cfg, inputs, s),
                                    cfg, inputs, args.methods, work))
    speedup = measured[2]["runs_per_s"] / measured[1]["runs_per_s"]
    estimate = json.loads(ESTIMATE.read_text())
    fig = {"bench": "scaling", "methods": args.methods, "datasets": cfg["datasets"], "ray": ray.__version__,
           "measured": measured, "speedup_2": round(speedup, 2), "efficiency_2": round(speedup / 2, 2),
           "estimate": {k: estimate[k] for k in ("device", "backbone", "features_h", "train_eval_h", "total_h")},
           "projected": project(estimate, min(1.0, speedup / 2)), "machine": info}
    text = figures_markdown(fig)
    print(text)
    if not args.no_write:
        FIGURES.write_text(f"# Scaling over executors\n\n{text}")
        FIGURES.with_suffix(".json").write_text(json.dumps(fig, indent=2) + "\n")
        replace_block(REPO / "docs" / "scaling.md", "scaling-figures", text)
        replace_block(REPO / "README.md", "scaling-figures", readme_markdown(fig))
    emit({k: fig[k] for k in ("measured", "speedup_2", "projected")})
    return fig


if __name__ == "__main__":
    main()
