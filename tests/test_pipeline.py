"""The train-stage orchestration (plans, resuming, not-applicable results, input checks) and, marked slow, the
whole DVC pipeline run through the real ``dvc`` command in a copy of the repository."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from conftest import COMMITTED_PARAMS, demo_transform

from biovlm import runs
from biovlm.config import load_config
from biovlm.data import get_dataset
from biovlm.filtering import ConfidenceTable

ROOT = Path(__file__).resolve().parents[1]
DATASETS2 = ["breastmnist", "bloodmnist"]  # 2 and 8 classes


def small_config(**overrides) -> dict:
    base = {"profile": "demo", "datasets": DATASETS2, "seeds": [1, 2], "fewshot.shots": [1, 4],
            "base2new.shots": 4, "crossdata.shots": 4, "features.max_shots": 4, "train.epochs": 2,
            "train.batch_size": 8, "biovlm.bank_size": 3, "filter.keep": 2,
            "crossdata.sources": "all"}  # the demo's own source list holds one of DATASETS2
    base.update(overrides)
    # the shared schedule for every method: the baselines' own (published) schedules and per-run values off
    for method in ("coop", "cocoop", "kgcoop", "biomedcoop", "clip_adapter"):
        if not any(k.startswith(f"{method}.") for k in overrides):
            base[f"{method}.train"] = {"epochs": base["train.epochs"], "batch_size": base["train.batch_size"]}
            base[f"{method}.per_run"] = {}
    return load_config(COMMITTED_PARAMS, base)


def fake_inputs(dataset: str, dim: int, max_shots: int = 4, n_test: int = 33, seed: int = 0) -> runs.DatasetInputs:
    """A FeatureSet stand-in with class-clustered features (what the train loop and runs read)."""
    import torch
    import torch.nn.functional as F

    info = get_dataset(dataset)
    c = info.n_classes
    g = torch.Generator().manual_seed(seed)
    proto = F.normalize(torch.randn(c, dim, generator=g), dim=-1)

    def draw(labels, *extra):
        x = proto[labels].view(len(labels), *([1] * len(extra)), dim)
        return F.normalize(x + 0.3 * torch.randn(len(labels), *extra, dim, generator=g), dim=-1)

    pool = torch.arange(c).repeat_interleave(max_shots)

    def shots(seed: int, k: int, classes=None) -> np.ndarray:
        classes = range(c) if classes is None else classes
        return np.sort(np.concatenate([np.flatnonzero(pool.numpy() == cl)[:k] for cl in classes]))

    test = torch.arange(c).repeat(n_test // c + 1)[:n_test]
    val = torch.arange(c).repeat(2)

    def val_shots(seed: int, k: int, classes=None) -> np.ndarray:
        classes = range(c) if classes is None else classes
        return np.flatnonzero(np.isin(val.numpy(), list(classes)))

    feats = SimpleNamespace(meta={}, pool_labels=pool, pool_clean=draw(pool),
                            pool_views={k: draw(pool, 2) for k in ("plain", "weak", "strong")},
                            val_features=draw(val), val_labels=val, test_features=draw(test), test_labels=test,
                            shots=shots, val_shots=val_shots)
    attributes = [[f"{w} texture", f"{w} outline", f"{w} border"] for w in
                  ("round", "lobed", "pale", "dark", "small", "large", "smooth", "rough", "thin", "thick", "bright")]
    text = F.normalize(proto[:, None, :] + 0.5 * torch.randn(c, 3, dim, generator=g), dim=-1)
    table = ConfidenceTable(dataset, list(info.prompt_names), attributes[:c], np.arange(len(pool)), pool.numpy(),
                            torch.einsum("pd,cnd->pcn", feats.pool_clean, text),
                            feats.pool_clean @ F.normalize(text.mean(1), dim=-1).T, 20.0)
    return runs.DatasetInputs(info, feats, table, f"digest-{dataset}-{seed}")


@pytest.fixture(scope="module")
def inputs(tiny_backbone):
    return {ds: fake_inputs(ds, tiny_backbone.embed_dim) for ds in DATASETS2}


def test_plan_covers_every_setting_once():
    cfg = small_config()
    plan = runs.plan_runs(cfg)
    fewshot = [r for r in plan if r.setting == "fewshot"]
    assert len(fewshot) == 2 * 2 * 2 and len(plan) == len(set(plan)) == 8 + 2 * 2
    assert plan[0] == runs.Run("fewshot", "breastmnist", 1, 1) and plan[0].name == "fewshot/breastmnist/k1_seed1"
    # crossdata needs K=16 fewshot checkpoints even when fewshot trains other K or is not selected
    cfg = small_config(**{"settings": ["crossdata"], "crossdata.sources": ["bloodmnist"]})
    assert runs.plan_runs(cfg) == [runs.Run("fewshot", "bloodmnist", 4, s) for s in (1, 2)]


def test_runs_resume_and_only_redo_what_changed(tiny_backbone, inputs, tmp_path, monkeypatch):
    cfg = small_config(settings=["fewshot", "base2new"])
    calls = []
    real = runs.train_and_evaluate

    def counting(method, cfg, backbone, data, run, log=None, memo=None):
        calls.append(run)
        if len(calls) == 3 and os.environ.get("_INTERRUPT"):
            raise KeyboardInterrupt  # the stage is killed during the third run
        return real(method, cfg, backbone, data, run, log, memo)

    monkeypatch.setattr(runs, "train_and_evaluate", counting)
    monkeypatch.setenv("_INTERRUPT", "1")
    with pytest.raises(KeyboardInterrupt):
        runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path, echo=lambda s: None)
    saved = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.pt"))
    assert saved == ["fewshot/breastmnist/k1_seed1.pt", "fewshot/breastmnist/k1_seed2.pt"]
    assert not list(tmp_path.rglob("*.tmp"))  # nothing half-written

    monkeypatch.delenv("_INTERRUPT")
    calls.clear()
    first = runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path, echo=lambda s: None)
    plan = runs.plan_runs(cfg)
    assert calls == plan[2:]  # resumed: the two finished runs were not redone
    calls.clear()
    again = runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path, echo=lambda s: None)
    assert calls == [] and again.equals(first)

    # a changed knob redoes every run of the method; fewer shot counts prune the stale files
    cfg2 = small_config(**{"settings": ["fewshot", "base2new"], "fewshot.shots": [4], "coop.n_ctx": 2})
    runs.run_method("coop", cfg2, tiny_backbone, inputs, tmp_path, echo=lambda s: None)
    assert calls == runs.plan_runs(cfg2)
    assert not list(tmp_path.rglob("k1_seed*.pt"))
    # changed inputs of one dataset redo only that dataset's runs
    calls.clear()
    changed = {**inputs, "bloodmnist": fake_inputs("bloodmnist", tiny_backbone.embed_dim, seed=1)}
    runs.run_method("coop", cfg2, tiny_backbone, changed, tmp_path, echo=lambda s: None)
    assert calls and {r.dataset for r in calls} == {"bloodmnist"}


def test_results_rows_of_every_setting(tiny_backbone, inputs, tmp_path):
    cfg = small_config()
    df = runs.run_method("biovlm", cfg, tiny_backbone, inputs, tmp_path / "biovlm", echo=lambda s: None)
    counts = df.groupby(["setting", "part"]).size().to_dict()
    assert counts == {("fewshot", "all"): 8, ("base2new", "base"): 4, ("base2new", "novel"): 4,
                      ("crossdata", "all"): 2 * 2 * 2}
    assert list(df.columns) == list(runs.RESULT_COLUMNS)
    # two classes: base and novel hold one class each: trivially 100 %, AUC undefined, nothing trained
    trivial = df[(df.setting == "base2new") & (df.target == "breastmnist")]
    assert (trivial.accuracy == 100.0).all() and (trivial.n_classes == 1).all() and trivial.auc.isna().all()
    other = df[(df.setting == "base2new") & (df.target == "bloodmnist")]
    assert set(other.n_classes) == {4} and set(other.n) == {17, 16}
    # the crossdata diagonal is the few-shot result of the same checkpoint
    diag = df[(df.setting == "crossdata") & (df.source == df.target)].set_index(["target", "seed"]).accuracy
    few = df[(df.setting == "fewshot") & (df.shots == 4)].set_index(["target", "seed"]).accuracy
    assert diag.sort_index().equals(few.sort_index())
    finite = df.drop(columns="auc").select_dtypes("number").to_numpy()
    assert np.isfinite(finite).all()


def test_each_run_selects_attributes_from_its_own_shots(tiny_backbone, inputs):
    """BioVLM's attributes in a run equal a selection from that run's shots alone; zero-shot methods see no labels
    and ensemble every attribute."""
    cfg, data = small_config(), inputs["bloodmnist"]
    for k, seed in ((1, 1), (4, 2)):
        state = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, data, runs.Run("fewshot", "bloodmnist", k, seed))
        own = data.features.shots(seed, k)
        expected = data.table.select(own, list(range(8)), cfg["filter"]["keep"])
        assert state["checkpoint"]["meta"]["attributes"] == expected
    k1 = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, data, runs.Run("fewshot", "bloodmnist", 1, 1))
    pooled = data.table.select(np.arange(len(data.features.pool_labels)), list(range(8)), cfg["filter"]["keep"])
    assert k1["checkpoint"]["meta"]["attributes"] != pooled  # not the choice of the whole pool (every seed's shots)
    zs = runs.train_and_evaluate("zeroshot_attr", cfg, tiny_backbone, data, runs.Run("fewshot", "bloodmnist", 4, 1))
    assert zs["checkpoint"]["meta"]["attributes"] == data.table.attributes


def test_base2new_run_ignores_every_novel_class_row_of_the_table(tiny_backbone, inputs):
    import copy

    import torch

    cfg, data = small_config(), inputs["bloodmnist"]
    run = runs.Run("base2new", "bloodmnist", 4, 1)
    before = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, data, run)
    garbage = copy.deepcopy(data)
    novel = [4, 5, 6, 7]
    rows = np.flatnonzero(np.isin(garbage.table.pool_labels, novel))
    g = torch.Generator().manual_seed(9)
    garbage.table.similarity[rows] = torch.rand(len(rows), 8, 3, generator=g)
    garbage.table.similarity[:, novel] = torch.rand(len(garbage.table.pool_labels), 4, 3, generator=g)
    garbage.table.class_similarity[:, novel] = torch.rand(len(garbage.table.pool_labels), 4, generator=g)
    after = runs.train_and_evaluate("biovlm", cfg, tiny_backbone, garbage, run)
    assert after["checkpoint"]["meta"]["attributes"] == before["checkpoint"]["meta"]["attributes"]
    for key, tensor in before["checkpoint"]["tensors"].items():
        assert torch.equal(tensor, after["checkpoint"]["tensors"][key]), key
    assert after["rows"] == before["rows"]


def test_a_seeds_results_do_not_depend_on_the_other_configured_seeds(tiny_backbone, synthetic_root, tmp_path):
    """Features, attribute tables and runs made for seeds [1] and for seeds [1, 2, 3]: seed 1's rows are equal,
    bit for bit, for a trained method, the linear probe (its C search) and the zero-shot ensemble."""
    from biovlm.attributes import curated
    from biovlm.features import extract_features, load_features
    from biovlm.filtering import build_table, save_table

    results = {}
    for seeds in ([1], [1, 2, 3]):
        folder = tmp_path / "-".join(map(str, seeds))
        for ds in DATASETS2:
            path = extract_features(ds, tiny_backbone, root=synthetic_root, size=28, views=2, seeds=seeds,
                                    max_shots=4, batch_size=16,
                                out=folder / "features" / f"{ds}.safetensors", transform=demo_transform())
            (folder / "filtered").mkdir(parents=True, exist_ok=True)
            save_table(build_table(get_dataset(ds), curated(ds), tiny_backbone, load_features(path)),
                       folder / "filtered" / f"{ds}.json")
        cfg = small_config(seeds=seeds, **{"backbone.name": "tiny", "crossdata.sources": ["bloodmnist"]})
        inputs = runs.load_inputs(cfg, folder / "features", folder / "filtered")
        for method in ("biovlm", "linear_probe", "zeroshot_attr"):
            df = runs.run_method(method, cfg, tiny_backbone, inputs, folder / "checkpoints" / method,
                                 echo=lambda line: None)
            results[(method, len(seeds))] = df[df.seed == 1].reset_index(drop=True)
    for method in ("biovlm", "linear_probe", "zeroshot_attr"):
        pd.testing.assert_frame_equal(results[(method, 1)], results[(method, 3)], check_exact=True)
        assert len(results[(method, 1)]) > 0


def test_linear_probe_is_not_applicable_to_unseen_classes(tiny_backbone, inputs, tmp_path):
    df = runs.run_method("linear_probe", small_config(), tiny_backbone, inputs, tmp_path, echo=lambda s: None)
    assert set(df.setting) == {"fewshot", "base2new"} and set(df.part) == {"all", "base"}
    assert len(df[df.setting == "base2new"]) == 4


def test_atomic_save_leaves_no_partial_file(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot save")

    target = tmp_path / "run.pt"
    with pytest.raises(RuntimeError):
        runs.atomic_save({"x": Unpicklable()}, target)
    assert list(tmp_path.iterdir()) == []
    runs.atomic_save({"hash": "h", "rows": []}, target)
    assert runs.load_if_current(target, "h") == {"hash": "h", "rows": []}
    assert runs.load_if_current(target, "other") is None
    target.write_bytes(b"garbage")
    assert runs.load_if_current(target, "h") is None


def test_missing_inputs_fail_before_training(tmp_path):
    cfg = small_config()
    expected = r"breastmnist.safetensors, .*bloodmnist.safetensors missing; run the features stage first"
    with pytest.raises(runs.InputError, match=expected):
        runs.load_inputs(cfg, tmp_path / "features", tmp_path / "filtered")
    (tmp_path / "features").mkdir()
    for ds in DATASETS2:
        (tmp_path / "features" / f"{ds}.safetensors").write_bytes(b"")
    with pytest.raises(runs.InputError, match=r"table\(s\) .*filtered/breastmnist.json, .* missing; run the filter"):
        runs.load_inputs(cfg, tmp_path / "features", tmp_path / "filtered")


def test_mismatched_feature_files_fail_before_training(tiny_backbone, synthetic_root, tmp_path):
    from biovlm.features import extract_features, load_features
    from biovlm.filtering import build_table, load_table, save_table

    feats, filtered = tmp_path / "features", tmp_path / "filtered"
    filtered.mkdir()
    for ds in ("breastmnist", "bloodmnist"):
        extract_features(ds, tiny_backbone, root=synthetic_root, size=28, views=1, seeds=[1], max_shots=4,
                         batch_size=128, out=feats / f"{ds}.safetensors",
                         transform=demo_transform())
        info = get_dataset(ds)
        pool = load_features(feats / f"{ds}.safetensors")
        table = build_table(info, [["a", "b"]] * info.n_classes, tiny_backbone, pool)
        save_table(table, filtered / f"{ds}.json")
    ok = dict(datasets=DATASETS2, seeds=[1], **{"backbone.name": "tiny", "features.views": 1})
    loaded = runs.load_inputs(small_config(**ok), feats, filtered)
    assert loaded["bloodmnist"].features.meta["views"] == 1 and loaded["bloodmnist"].table.attributes[0] == ["a", "b"]
    with pytest.raises(runs.InputError, match=r"views=1.*views=2.*rerun the features stage"):
        runs.load_inputs(small_config(**{**ok, "features.views": 2}), feats, filtered)
    with pytest.raises(runs.InputError, match=r"backbone='tiny'.*backbone='tiny-pretrained'"):
        runs.load_inputs(small_config(**{**ok, "backbone.name": "tiny-pretrained"}), feats, filtered)
    with pytest.raises(runs.InputError, match=r"seeds \[1\] up to K=4, but params.yaml asks for seeds \[1, 2\]"):
        runs.load_inputs(small_config(**{**ok, "seeds": [1, 2]}), feats, filtered)
    message = (f"{filtered / 'breastmnist.json'} was built for the class names ['malignant', 'normal, benign'], "
               f"data.class_names 'reference' names them ['malignant', 'benign']; rerun the attributes and filter "
               f"stages")
    with pytest.raises(runs.InputError, match=f"^{re.escape(message)}$"):
        runs.load_inputs(small_config(**{**ok, "data.class_names": "reference"}), feats, filtered)
    table = load_table(filtered / "bloodmnist.json")
    save_table(ConfidenceTable(**{**vars(table), "attributes": table.attributes[:3]}), filtered / "bloodmnist.json")
    with pytest.raises(runs.InputError, match=r"attributes for 3 classes, bloodmnist has 8"):
        runs.load_inputs(small_config(**ok), feats, filtered)
    shifted = ConfidenceTable(**{**vars(table), "pool_indices": table.pool_indices + 1})
    save_table(shifted, filtered / "bloodmnist.json")
    with pytest.raises(runs.InputError, match=r"bloodmnist.json scores other pool images than .*bloodmnist\.safet"):
        runs.load_inputs(small_config(**ok), feats, filtered)
    (filtered / "bloodmnist.json").write_text(json.dumps({"kept": [["a"]] * 8}))  # a filter output of before
    with pytest.raises(runs.InputError, match=r"not a confidence table of this version .*rerun the filter stage"):
        runs.load_inputs(small_config(**ok), feats, filtered)


# ---------------------------------------------------------------------------------------------- end to end
def _dvc(args: list[str], cwd: Path, timeout: int = 900) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"dvc {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def _git(args: list[str], cwd: Path) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True)


def _numbers(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield obj


@pytest.mark.slow
def test_dvc_pipeline_end_to_end(tmp_path):
    """Copy the repository, run the demo pipeline (smaller: 4 datasets, 1 seed, tiny backbone) through the real
    `dvc`, check every metrics file and the report, then `dvc exp run -S` one knob and see `dvc metrics diff`."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    repo = tmp_path / "repo"
    for rel in filter(None, files.decode().split("\0")):
        if (ROOT / rel).is_file():
            (repo / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, repo / rel)
    (repo / "params.yaml").write_text(COMMITTED_PARAMS.read_text())  # not an applied experiment's values
    _git(["init", "-q"], repo)
    _git(["add", "-A"], repo)
    _git(["commit", "-qm", "copy"], repo)
    if not (repo / ".dvc").exists():
        _dvc(["init", "-q"], repo)

    small = ["-S", "profile=demo", "-S", "datasets=[breastmnist,bloodmnist,pneumoniamnist,organamnist]",
             "-S", "seeds=[1]", "-S", "fewshot.shots=[1,16]", "-S", "backbone.name=tiny", "-S", "train.epochs=2",
             "-S", "methods=[zeroshot,coop,linear_probe,biovlm]", "-S", "backbone.threads=1"]
    _dvc(["exp", "run", *small], repo)
    metrics = repo / "metrics"
    for name in ("summary", "detail/fewshot", "detail/base2new", "detail/crossdata"):
        values = json.loads((metrics / f"{name}.json").read_text())
        numbers = list(_numbers(values))
        assert numbers and all(math.isfinite(v) for v in numbers), name
    summary = json.loads((metrics / "summary.json").read_text())
    assert set(summary) == {"fewshot", "base2new", "crossdata"}
    assert set(summary["fewshot"]) == {"zeroshot", "coop", "linear_probe", "biovlm"}
    assert "linear_probe" not in summary["crossdata"] and "linear_probe" not in summary["base2new"]
    assert (metrics / "plots" / "fewshot_curve.csv").exists() and (metrics / "plots" / "crossdata.csv").exists()
    md = (repo / "report" / "report.md").read_text()
    assert "| **Average** |" in md and "nan" not in md.lower()
    assert (repo / "report" / "tables.tex").exists() and (repo / "report" / "figures" / "fewshot_average.png").exists()
    assert "stages" not in (repo / "dvc.yaml").read_text().split("plots:")[-1]  # nothing rewrote dvc.yaml

    # commit the result, change one BioVLM knob (the same command plus one -S): features are not recomputed, only
    # BioVLM's runs are retrained
    # (the other methods' run files are reused), and `dvc metrics diff` shows the change
    _git(["add", "-A"], repo)
    _git(["commit", "-qm", "demo results"], repo)
    out = _dvc(["exp", "run", *small, "-S", "biovlm.select_ratio=1.0"], repo)  # each run composes from conf/
    assert "Running stage 'train@breastmnist'" in out and "Running stage 'features'" not in out
    # each dataset's stage: 3 BioVLM runs (K 1 and 16, base-to-novel) retrained, CoOp's reused
    assert out.count("biovlm: 3 runs (3 trained, 0 reused, 0 of them from the run store)") == 4
    assert out.count("coop: 3 runs (0 trained, 3 reused, ") == 4
    diff = _dvc(["metrics", "diff", "--json"], repo)
    changed = json.loads(diff)
    assert any("biovlm" in key for path in changed.values() for key in path), diff[:2000]

    # the committed results and the experiment (applied to the workspace) side by side: the one knob that differs,
    # then the headline numbers
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                          check=True).stdout.strip()[:10]
    table = subprocess.run([sys.executable, "-m", "biovlm.compare", head, "workspace"], cwd=repo,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert table[1].split() == ["data", "SYNTHETIC", "DATA", "SYNTHETIC", "DATA"], table
    assert table[2:4] == ["knobs that differ", table[3]] and table[3].split()[0] == "biovlm.select_ratio", table
    assert table[3].split()[1:] == ["0.5", "1.0"], table
    biovlm_rows = [line.split()[1:] for line in table if line.startswith("  BioVLM ")]
    assert len(biovlm_rows) == 3 and all(len(cells) == 2 for cells in biovlm_rows), table
