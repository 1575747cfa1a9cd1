"""Planning: which runs a method needs, and the hash that names each run's result.

A *run* is (setting, dataset, shots K, seed): ``fewshot`` trains on K shots of every class and is tested on all
classes; ``base2new`` trains on K shots of the base classes and is tested on base and novel classes separately.
The cross-dataset setting trains nothing new: it reloads the ``fewshot`` checkpoint with ``crossdata.shots`` of
each source and tests it on every dataset.

A run's hash (``run_hash``) covers everything its result depends on: the method and train knobs (with the run's
own ``per_run`` values), ``filter.keep``, the prompt wording, the run itself, the bytes of the dataset's feature file
and confidence table, and the source code of the training and evaluation path (``CODE_FILES``). Where and how a run
is computed (``executor``) is not part of it: every executor gives the same result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from biovlm.config import crossdata_sources, method_config

# Source files whose change invalidates finished runs (backbone changes also reach runs through the features).
CODE_FILES = ("plan.py", "runs.py", "train.py", "routing.py", "evaluate.py", "prompts.py", "backbone.py",
              "filtering.py", "sampling.py", "methods/*.py")
RUN_FORMAT = 1


@dataclass(frozen=True)
class Run:
    setting: str  # "fewshot" | "base2new"
    dataset: str
    shots: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting}/{self.dataset}/k{self.shots}_seed{self.seed}"


def plan_runs(cfg: Mapping) -> list[Run]:
    """The runs of one method, in execution order: few-shot (every dataset, K, seed), the few-shot runs the
    cross-dataset setting needs (even when ``fewshot`` is not a selected setting), then base-to-novel."""
    settings, seeds = cfg["settings"], cfg["seeds"]
    runs: list[Run] = []
    if "fewshot" in settings:
        runs += [Run("fewshot", ds, k, s) for ds in cfg["datasets"] for k in sorted(cfg["fewshot"]["shots"])
                 for s in seeds]
    if "crossdata" in settings:
        k = cfg["crossdata"]["shots"]
        runs += [r for ds in crossdata_sources(cfg) for s in seeds if (r := Run("fewshot", ds, k, s)) not in runs]
    if "base2new" in settings:
        runs += [Run("base2new", ds, cfg["base2new"]["shots"], s) for ds in cfg["datasets"] for s in seeds]
    return runs


def code_digest() -> str:
    """Hash of the source of the training and evaluation path (``CODE_FILES``)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for pattern in CODE_FILES:
        for path in sorted(root.glob(pattern)):
            digest.update(path.relative_to(root).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def run_hash(method: str, cfg: Mapping, run: Run, inputs_digest: str, code: str) -> str:
    """Hash of everything a run's result depends on."""
    mcfg = method_config(cfg, method, run.setting, run.dataset)
    data = cfg.get("data") or {}
    texts = {k: data[k] for k in ("class_names", "attribute_template", "template") if k in data}  # prompt wording
    payload = {"format": RUN_FORMAT, "method": method, "knobs": mcfg[method], "train": mcfg["train"],
               "keep": cfg["filter"]["keep"], "texts": texts, "run": asdict(run), "inputs": inputs_digest,
               "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def crossdata_hash(source_hash: str, digests: Mapping[str, str]) -> str:
    """Hash of one source checkpoint's evaluation on every dataset of ``digests`` (dataset -> inputs digest)."""
    all_inputs = hashlib.sha256("".join(digests[d] for d in digests).encode()).hexdigest()
    return hashlib.sha256(f"{source_hash}:{all_inputs}:{list(digests)}".encode()).hexdigest()
