"""Every run of one method: check inputs, train, evaluate, save; resumable run by run.

Planning (which runs, and the hash naming each result) is ``biovlm/plan.py``; the run store ``biovlm/store.py``;
where pending runs are computed (this process, or Ray workers) ``biovlm/executors.py``. This module loads and
checks the inputs, computes one run (``Worker``) and puts the pieces together (``run_methods``).

Resuming. Each run's result (method checkpoint, training history, metric rows, how its images became features) is
one file ``<out>/<setting>/<dataset>/k<K>_seed<S>.pt``, written atomically (temporary file + rename) and holding the
run's hash. A rerun skips every run whose file, or the run store, holds the current hash, so an interrupted train
stage resumes where it stopped, and a changed knob, input or code retrains exactly the runs it affects. Files no
plan refers to are deleted at the end.

Inputs are checked before any training starts (``load_inputs``): a missing or mismatched feature file
(other backbone, image size, view count, seeds or too few shots) or attribute file is an error naming the stage
to rerun.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from biovlm import storage
from biovlm.config import (
    FEATURES_DIR,
    FILTERED_DIR,
    all_shots,
    crossdata_sources,
    dataset_info,
    feature_path,
    method_config,
)
from biovlm.evaluate import RESULT_COLUMNS, classification_metrics
from biovlm.plan import Run, code_digest, crossdata_hash, plan_runs, run_hash
from biovlm.store import RunStore, atomic_save, load_if_current

RunLog = Callable[[str, dict, int], None]  # (run name, epoch record, epoch)
MethodLog = Callable[[str, str, dict, int], None]  # (method, run name, epoch record, epoch)


@dataclass(frozen=True)
class Task:
    """One run to compute: the method, the run, and the hash its result is stored under."""

    method: str
    run: Run
    hash: str


class InputError(ValueError):
    """A feature or attribute file is missing or does not match the configuration."""


def check_weights(weights_sha256: str, backbone_name: str, inputs: Mapping[str, DatasetInputs]) -> None:
    """Refuse features that another set of weights made (another machine's download, a half-loaded model)."""
    for name, item in inputs.items():
        made_by = item.features.meta.get("weights_sha256")
        if made_by != weights_sha256:
            raise InputError(f"features of {name} were made by weights with sha256 {made_by}, but the loaded "
                             f"{backbone_name} has {weights_sha256}: rerun the features stage (dvc repro)")


# ---------------------------------------------------------------------------------------------- hashing, files
def file_digest(path: str | Path) -> str:
    from biovlm.data import file_hash

    return file_hash(path)


# ---------------------------------------------------------------------------------------------- inputs
@dataclass
class DatasetInputs:
    info: Any  # biovlm.data.DatasetInfo
    features: Any  # biovlm.features.FeatureSet
    table: Any  # biovlm.filtering.ConfidenceTable (None: no attributes)
    digest: str  # hash of the feature and confidence-table files

    def attributes_for(self, method_name: str, class_ids: Sequence[int], positions, keep: int):
        """Attributes by label id for one run: a zero-shot method uses every attribute (it sees no labels); a
        trained one the ``keep`` best of each training class, chosen from its own shots ``positions``."""
        if self.table is None:
            return None
        if is_static(method_name) or positions is None:
            return [list(a) for a in self.table.attributes]
        return self.table.select(positions, list(class_ids), keep)


def expected_feature_meta(cfg: Mapping, dataset: str) -> dict:
    from biovlm.features import ViewTransform

    return {"dataset": dataset, "backbone": cfg["backbone"]["name"], "size": cfg["data"]["size"],
            "views": cfg["features"]["views"], "transform": ViewTransform.from_config(cfg["features"]).meta()}


def load_feature_file(cfg: Mapping, dataset: str, path: str | Path, fingerprint: str | None = None):
    """The feature file of ``dataset``, checked field by field against ``cfg`` (backbone, image size, views,
    transform, seeds and shots; the backbone's weights when ``fingerprint`` is given): InputError otherwise."""
    from biovlm.features import FeatureFileError, load_features

    expect = expected_feature_meta(cfg, dataset)
    if fingerprint is not None:
        expect["weights_sha256"] = fingerprint
    try:
        feats = load_features(path, expect=expect)
    except FeatureFileError as e:  # a damaged file: the message says what to do itself
        raise InputError(str(e)) from None
    except (ValueError, KeyError) as e:
        raise InputError(f"{path} does not match params.yaml ({e}); rerun the features stage "
                         f"(dvc repro features)") from None
    meta, need_k, seeds = feats.meta, max(all_shots(cfg)), list(cfg["seeds"])
    missing_seeds = sorted(set(seeds) - set(meta["seeds"]))  # load_features checked the format: both are there
    if missing_seeds or int(meta["max_shots"]) < need_k:
        raise InputError(f"{path} holds shots for seeds {meta['seeds']} up to K={meta['max_shots']}, "
                         f"but params.yaml asks for seeds {seeds} and K up to {need_k}; rerun the features "
                         f"stage (dvc repro features)")
    return feats


def load_inputs(cfg: Mapping, features_dir: str | Path = FEATURES_DIR, filtered_dir: str | Path | None = FILTERED_DIR,
                datasets: Sequence[str] | None = None) -> dict[str, DatasetInputs]:
    """Load and check the feature file and confidence table of every dataset, before any training."""
    datasets = list(datasets or cfg["datasets"])
    paths = {ds: Path(features_dir) / feature_path(ds).name for ds in datasets}
    missing = [str(p) for p in paths.values() if not p.exists()]
    if missing:
        raise InputError(f"feature file(s) {', '.join(missing)} missing; run the features stage first "
                         f"(dvc repro features)")
    if filtered_dir is not None:
        missing = [str(Path(filtered_dir) / f"{ds}.json") for ds in datasets
                   if not (Path(filtered_dir) / f"{ds}.json").exists()]
        if missing:
            raise InputError(f"confidence table(s) {', '.join(missing)} missing; run the filter stage first "
                             f"(dvc repro filter)")

    from biovlm.filtering import load_table

    inputs = {}
    for ds in datasets:
        info, path = dataset_info(cfg, ds), paths[ds]
        feats = load_feature_file(cfg, ds, path)
        table, digest = None, file_digest(path)
        if filtered_dir is not None:
            fpath = Path(filtered_dir) / f"{ds}.json"
            try:
                table = load_table(fpath)
            except (ValueError, KeyError) as e:
                raise InputError(f"{fpath} is not a confidence table of this version ({e}); rerun the filter stage "
                                 f"(dvc repro filter)") from None
            if len(table.attributes) != info.n_classes:
                raise InputError(f"{fpath} holds attributes for {len(table.attributes)} classes, {ds} has "
                                 f"{info.n_classes}; rerun the attributes and filter stages")
            if table.class_names != list(info.prompt_names):
                raise InputError(f"{fpath} was built for the class names {table.class_names}, data.class_names "
                                 f"{info.class_names!r} names them {list(info.prompt_names)}; rerun the attributes "
                                 f"and filter stages")
            if table.attribute_template != info.attribute_template:
                raise InputError(f"{fpath} was built with data.attribute_template {table.attribute_template!r}, "
                                 f"params.yaml asks for {info.attribute_template!r}; rerun the filter stage "
                                 f"(dvc repro filter)")
            if not np.array_equal(table.pool_indices, feats.pool_indices):
                raise InputError(f"{fpath} scores other pool images than {path}; rerun the filter stage "
                                 f"(dvc repro filter)")
            digest = hashlib.sha256((digest + file_digest(fpath)).encode()).hexdigest()
        inputs[ds] = DatasetInputs(info, feats, table, digest)
    return inputs


# ---------------------------------------------------------------------------------------------- one run
def is_static(method_name: str) -> bool:
    """Methods that learn nothing from the shots (zero-shot): their predictions do not depend on K, the seed or
    the cross-dataset source, so each dataset is evaluated once per class list and the rows are reused."""
    from biovlm.methods import METHODS
    from biovlm.methods.base import Method

    cls = METHODS[method_name]
    return not cls.trainable and cls.setup is Method.setup


def share_text_features(backbone) -> None:
    """Memoise ``backbone.encode_texts`` for this process: constant texts (templates, attributes) are then
    encoded once per process instead of once per run (every run builds a fresh method with its own cache)."""
    if getattr(backbone, "_biovlm_shared_texts", False):
        return
    encode, memo = backbone.encode_texts, {}

    def encode_texts(texts, batch_size: int = 256):
        key = tuple(texts)
        if key not in memo:
            memo[key] = encode(list(texts), batch_size)
        return memo[key].clone()

    backbone.encode_texts = encode_texts
    backbone._biovlm_shared_texts = True


def class_specific(method_name: str) -> bool:
    """Methods whose classifier is tied to the training classes (the linear probe): no novel classes, no transfer."""
    from biovlm.methods import METHODS

    return bool(METHODS[method_name].class_specific)


def evaluate_part(method, data: DatasetInputs, class_ids: Sequence[int], batch_size: int = 1024,
                  trivial: bool = False, attributes: Sequence[Sequence[str]] | None = None) -> dict:
    """Metrics of ``method`` on the test images of ``class_ids`` of ``data``, classified among those classes
    (``attributes``: by label id of ``data``'s dataset, for methods that read them at test time)."""
    import torch

    from biovlm.train import predict

    labels = np.asarray(data.features.test_labels).reshape(-1)
    class_ids = [int(c) for c in class_ids]
    mask = np.isin(labels, class_ids)
    lut = np.full(int(labels.max()) + 1, -1)  # pragma: no mutate: only class_ids' entries are read (size, fill)
    lut[class_ids] = np.arange(len(class_ids))
    y = lut[labels[mask]]
    if trivial:  # one class: the only possible answer, whatever the method
        probs = np.ones((len(y), 1))
    else:
        x = data.features.test_features[torch.as_tensor(np.flatnonzero(mask))]
        names = [data.info.prompt_names[c] for c in class_ids]
        attrs = [attributes[c] for c in class_ids] if attributes is not None else None
        probs = predict(method, x, names, data.info, attrs, batch_size=batch_size).numpy()
    return {**classification_metrics(probs, y), "n_classes": len(class_ids)}


def _row(method: str, setting: str, source: str, target: str, run: Run, part: str, metrics: dict) -> dict:
    return {"method": method, "setting": setting, "source": source, "target": target, "shots": run.shots,
            "seed": run.seed, "part": part, **{k: metrics[k] for k in RESULT_COLUMNS if k in metrics}}


def train_and_evaluate(method_name: str, cfg: Mapping, backbone, data: DatasetInputs, run: Run,
                       log: Callable[[dict, int], None] | None = None, memo: dict | None = None) -> dict:
    """Train one run and evaluate it; returns {"checkpoint", "history", "rows", "features"}. ``memo`` (a dict kept
    across the runs of a static method) reuses evaluations that cannot differ between runs."""
    from biovlm.methods import NotTransferable, build_method
    from biovlm.sampling import base_novel_split
    from biovlm.train import NonFiniteLossError, fit

    n = data.info.n_classes
    if run.setting == "fewshot":
        train_ids, parts = list(range(n)), [("all", list(range(n)))]
    else:
        base, novel = base_novel_split(n)
        train_ids, parts = base.tolist(), [("base", base.tolist()), ("novel", novel.tolist())]
    cfg = method_config(cfg, method_name, run.setting, run.dataset)
    positions = data.features.shots(run.seed, run.shots, classes=train_ids)
    attributes = data.attributes_for(method_name, train_ids, positions if len(train_ids) > 1 else None,
                                     cfg["filter"]["keep"])
    method = build_method(method_name, backbone, cfg, data.info, attributes=attributes, class_ids=train_ids)
    history: dict = {"epochs": [], "steps": 0, "seconds": 0.0, "skipped": None}
    if len(train_ids) > 1:
        val_rows = data.features.val_shots(run.seed, run.shots)  # the run's own seed; fit keeps its classes
        try:
            history = fit(method, data.features, positions, cfg, run.seed, log=log, val_rows=val_rows)
        except NonFiniteLossError as e:  # name the run: which dataset, K and seed diverged
            raise NonFiniteLossError(f"{run.name}: {e}") from None
    else:
        history["skipped"] = "one training class: every prediction is that class"
    batch = cfg["train"].get("eval_batch_size", 1024)  # pragma: no mutate: predictions do not depend on the batch size
    rows = []
    for part, ids in parts:
        unseen = part == "novel"
        if unseen and class_specific(method_name):
            continue  # not applicable: reported as absent
        key = (run.dataset, tuple(ids))
        try:
            if memo is not None and key in memo:
                metrics = memo[key]
            else:
                metrics = evaluate_part(method, data, ids, batch, trivial=len(ids) == 1, attributes=attributes)
        except NotTransferable:
            continue
        if memo is not None:
            memo[key] = metrics
        rows.append(_row(method_name, run.setting, run.dataset, run.dataset, run, part, metrics))
    return {"checkpoint": method.checkpoint(), "history": history, "rows": rows, "features": image_record(data)}


def image_record(data: DatasetInputs) -> dict:
    """How the run's images became features (image size, transform, backbone and its weights), as its feature file
    records it: ``biovlm.predict`` prepares new images the same way."""
    meta = getattr(data.features, "meta", None) or {}
    return {k: meta[k] for k in ("size", "transform", "backbone", "weights_sha256") if k in meta}


def cross_evaluate(method_name: str, cfg: Mapping, backbone, saved: dict, source: str, run: Run,
                   inputs: Mapping[str, DatasetInputs], memo: dict | None = None) -> list[dict]:
    """Rows of the few-shot checkpoint ``saved`` of ``source`` tested on every other dataset ([] if the method
    cannot classify other classes)."""
    from biovlm.methods import NotTransferable, build_method

    if class_specific(method_name):
        return []
    src = inputs[source]
    cfg = method_config(cfg, method_name, run.setting, run.dataset)  # the few-shot run's values
    all_ids = list(range(src.info.n_classes))
    attributes = src.attributes_for(method_name, all_ids, src.features.shots(run.seed, run.shots),
                                    cfg["filter"]["keep"])  # as the few-shot run trained
    method = build_method(method_name, backbone, cfg, src.info, attributes=attributes)
    method.load_checkpoint(saved["checkpoint"])
    rows = []
    batch = cfg["train"].get("eval_batch_size", 1024)  # pragma: no mutate: predictions do not depend on the batch size
    for target, data in inputs.items():
        if target == source:  # in-domain diagonal: the few-shot run's own test result
            rows += [{**r, "setting": "crossdata"} for r in saved["rows"] if r["part"] == "all"]
            continue
        ids = list(range(data.info.n_classes))
        try:
            if memo is not None and (target, tuple(ids)) in memo:
                metrics = memo[(target, tuple(ids))]
            else:
                metrics = evaluate_part(method, data, ids, batch,
                                        attributes=data.attributes_for(method_name, ids, None, 0))
        except NotTransferable:
            return []
        if memo is not None:
            memo[(target, tuple(ids))] = metrics
        rows.append(_row(method_name, "crossdata", source, target, run, "all", metrics))
    return rows


# ---------------------------------------------------------------------------------------------- one run, anywhere
class Worker:
    """Computes runs with one loaded backbone and the inputs of the datasets it may be asked for: what the local
    executor runs in the stage's process, and each Ray worker in its own (``biovlm/executors.py``)."""

    def __init__(self, cfg: Mapping, backbone, inputs: Mapping[str, DatasetInputs]):
        self.cfg, self.backbone, self.inputs = cfg, backbone, inputs
        self.memos: dict[str, dict] = {}  # per static method: evaluations that cannot differ between its runs
        share_text_features(backbone)

    def run(self, task: Task, log: Callable[[dict, int], None] | None = None) -> dict:
        """The result of ``task``: {"hash", "run", "method", "checkpoint", "history", "rows"}."""
        memo = self.memos.setdefault(task.method, {}) if is_static(task.method) else None
        state = train_and_evaluate(task.method, self.cfg, self.backbone, self.inputs[task.run.dataset], task.run,
                                   log, memo)
        return {**state, "hash": task.hash, "run": asdict(task.run), "method": task.method}


# ---------------------------------------------------------------------------------------------- the methods
def run_method(method_name: str, cfg: Mapping, backbone, inputs: Mapping[str, DatasetInputs], out_dir: str | Path,
               log: RunLog | None = None, echo: Callable[[str], None] = print, store: RunStore | None = None,
               datasets: Sequence[str] | None = None, crossdata: bool = True, executor=None) -> pd.DataFrame:
    """Execute (or reuse) every run of ``method_name`` on ``datasets`` (default: all of ``cfg``) and return the rows
    of the selected settings, with the cross-dataset rows when ``crossdata`` (which needs every dataset's inputs).
    ``executor``: where pending runs are computed (default: this process, with ``backbone``)."""
    from biovlm.executors import LocalExecutor

    out_dir = Path(out_dir)
    executor = executor or LocalExecutor(cfg, backbone, inputs)
    method_log = (lambda method, name, record, epoch: log(name, record, epoch)) if log else None
    saved = run_methods([method_name], cfg, inputs, {method_name: out_dir}, executor, method_log, echo, store,
                        datasets)[method_name]
    rows, keep = selected_rows(cfg, saved), run_files(out_dir, saved)
    if crossdata and "crossdata" in cfg["settings"]:
        rows += run_crossdata(method_name, cfg, backbone, inputs, saved, store, out_dir, keep, echo=echo)
    prune(out_dir, keep)
    return results_frame(rows)


def selected_rows(cfg: Mapping, saved: Mapping[Run, dict]) -> list[dict]:
    """The metric rows of ``saved`` runs in the selected settings (a crossdata source's few-shot run may be
    trained without ``fewshot`` being one)."""
    return [r for state in saved.values() for r in state["rows"] if r["setting"] in cfg["settings"]]


def run_files(out_dir: Path, saved: Mapping[Run, dict]) -> set[Path]:
    return {Path(out_dir) / f"{run.name}.pt" for run in saved}


def run_methods(methods: Sequence[str], cfg: Mapping, inputs: Mapping[str, DatasetInputs],
                out_dirs: Mapping[str, Path], executor, log: MethodLog | None = None,
                echo: Callable[[str], None] = print, store: RunStore | None = None,
                datasets: Sequence[str] | None = None) -> dict[str, dict[Run, dict]]:
    """Every run of ``methods`` on ``datasets``, by method and run, in plan order. A run is reused from its file in
    ``out_dirs[method]`` when that holds the run's current hash, else from ``store`` (which outlives DVC's restored
    outputs); the other runs of all methods go to ``executor`` together (so many workers stay busy), and each result
    is stored, in the store and its file, as soon as it comes back: an interruption loses no finished run."""
    code, t_start = code_digest(), time.perf_counter()
    plans = {m: [r for r in plan_runs(cfg) if datasets is None or r.dataset in datasets] for m in methods}
    total = sum(len(p) for p in plans.values())
    states: dict[str, dict[Run, dict]] = {m: {} for m in methods}
    counts = {m: {"file": 0, "store": 0, "computed": 0} for m in methods}
    pending: list[Task] = []
    done = 0
    for method, runs in plans.items():
        out_dir = Path(out_dirs[method])
        if stale := storage.remove_stale_temporaries(out_dir):  # a killed run's; DVC would see a changed folder
            echo(f"{method}: removed {len(stale)} temporary file(s) left by an interrupted run: "
                 f"{', '.join(str(p) for p in stale)}")
        for run in runs:
            task = Task(method, run, run_hash(method, cfg, run, inputs[run.dataset].digest, code))
            state, source = reuse(out_dir / f"{run.name}.pt", task.hash, store)
            if state is None:
                pending.append(task)
                continue
            states[method][run], done = state, done + 1
            counts[method][source] += 1
            how = "done before, reused" if source == "file" else "reused from the run store"
            echo(f"[{done}/{total}] {_describe(method, run, state)} ({how})")
    if pending and len(methods) > 1:
        echo(f"{len(pending)} of {total} runs to compute on {executor.describe()}")
    task_log = (lambda task, record, epoch: log(task.method, task.run.name, record, epoch)) if log else None
    for task, state, seconds in executor.map(pending, task_log):
        save_result(state, task.hash, store, Path(out_dirs[task.method]) / f"{task.run.name}.pt")
        states[task.method][task.run], done = state, done + 1
        counts[task.method]["computed"] += 1
        echo(f"[{done}/{total}] {_describe(task.method, task.run, state)} ({seconds:.1f} s)")
    elapsed = time.perf_counter() - t_start
    for method, c in counts.items():
        n = len(plans[method])
        echo(f"{method}: {n} runs ({c['computed']} trained, {n - c['computed']} reused, {c['store']} of them from "
             f"the run store) in {elapsed:.1f} s")
    return {m: {run: states[m][run] for run in plans[m]} for m in methods}


def _describe(method: str, run: Run, state: dict) -> str:
    acc = ", ".join(f"{r['part']} {r['accuracy']:.1f}" for r in state["rows"])
    return f"{method} {run.name}: accuracy {acc or 'n/a'}"


def reuse(path: Path | None, key: str, store: RunStore | None) -> tuple[dict | None, str]:
    """The result of hash ``key`` if already computed, and where it was: ``"file"`` (``path``, a DVC output, holds
    it) or ``"store"`` (the run store does; ``path`` is rewritten from it); (None, "") if neither has it."""
    state = None if path is None else load_if_current(path, key)
    if state is not None:
        return state, "file"
    state = None if store is None else store.get(key)
    if state is None:
        return None, ""
    if path is not None:
        atomic_save(output_state(state), path)
    return state, "store"


def save_result(state: dict, key: str, store: RunStore | None, path: Path | None) -> None:
    """Keep a computed result: in the run store under ``key`` and at ``path`` (a DVC output, without wall time)."""
    if store is not None:
        store.put(key, state)
    if path is not None:
        atomic_save(output_state(state), path)


def reuse_or_compute(path: Path | None, key: str, store: RunStore | None, compute: Callable[[], dict]) -> dict:
    """``reuse``, else ``compute()`` and ``save_result``."""
    state, _ = reuse(path, key, store)
    if state is None:
        state = compute()
        save_result(state, key, store, path)
    return state


def run_crossdata(method_name: str, cfg: Mapping, backbone, inputs: Mapping[str, DatasetInputs],
                  sources: Mapping[Run, dict], store: RunStore | None, out_dir: Path | None = None,
                  keep: set[Path] | None = None, echo: Callable[[str], None] = print) -> list[dict]:
    """The cross-dataset rows of ``method_name``: each source's few-shot state (``sources``, by run) tested on every
    dataset of ``inputs``; reused from ``out_dir`` or ``store`` by hash, else computed and stored."""
    k, rows = cfg["crossdata"]["shots"], []
    # a static method's evaluation of a target is the same each time (speed only)
    memo = {} if is_static(method_name) else None  # pragma: no mutate
    digests = {d: inputs[d].digest for d in inputs}
    for source in crossdata_sources(cfg):
        for seed in cfg["seeds"]:
            run = Run("fewshot", source, k, seed)
            expected = crossdata_hash(sources[run]["hash"], digests)
            path = None if out_dir is None else out_dir / "crossdata" / source / f"k{k}_seed{seed}.pt"
            if path is not None:
                keep.add(path)
            state = reuse_or_compute(path, expected, store, lambda run=run, source=source, expected=expected: {
                "hash": expected,
                "rows": cross_evaluate(method_name, cfg, backbone, sources[run], source, run, inputs, memo)})
            rows += state["rows"]
    echo(f"{method_name} crossdata: {len(rows)} rows")
    return rows


def source_states(method_name: str, cfg: Mapping, inputs: Mapping[str, DatasetInputs], checkpoints: str | Path,
                  store: RunStore | None) -> dict[Run, dict]:
    """The few-shot states the cross-dataset setting tests, from the run store or ``checkpoints/<source>/<method>``
    (the train stages'), each checked against its current hash."""
    code, k, states, missing = code_digest(), cfg["crossdata"]["shots"], {}, []
    for source in crossdata_sources(cfg):
        for seed in cfg["seeds"]:
            run = Run("fewshot", source, k, seed)
            expected = run_hash(method_name, cfg, run, inputs[source].digest, code)
            state = store.get(expected) if store is not None else None
            if state is None:
                state = load_if_current(Path(checkpoints) / source / method_name / f"{run.name}.pt", expected)
            if state is None:
                missing.append(f"{source} K={k} seed {seed}")
            else:
                states[run] = state
    if missing:
        raise InputError(f"{method_name}: no current few-shot checkpoint of {', '.join(missing)}; run the train "
                         f"stages of those datasets first (dvc repro train@<dataset>)")
    return states


def output_state(state: dict) -> dict:
    """A run's state as the checkpoint file (a DVC output) holds it: without its wall time, so the same run writes
    the same bytes in every process (the run store keeps the time)."""
    history = {k: v for k, v in (state.get("history") or {}).items() if k != "seconds"}
    return {**state, "history": history} if "history" in state else state


def results_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    order = {"fewshot": 0, "base2new": 1, "crossdata": 2}
    return frame.sort_values(["setting", "source", "target", "shots", "seed", "part"],
                             key=lambda s: s.map(order) if s.name == "setting" else s,
                             kind="stable").reset_index(drop=True)


def prune(out_dir: Path, keep: set[Path]) -> None:
    """Delete run files no current plan refers to (left by earlier configurations), then empty folders."""
    for path in out_dir.rglob("*.pt"):  # nothing when out_dir does not exist
        if path not in keep:
            path.unlink()
    for folder in sorted((p for p in out_dir.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(folder.iterdir()):
            folder.rmdir()
