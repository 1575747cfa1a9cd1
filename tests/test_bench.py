"""The training-step benchmark's re-creation of the reference compute pattern computes the project's BioVLM loss.

bench/train_step.py times this project's BioVLM step against ``ReferenceBioVLM`` (three image-tower passes, prompts
and attribute texts padded to the full context, per-sample Python loops). Its speed-up only means something if both
compute the same loss and the same gradient; this checks that on the two tiny text-tower kinds (BERT and CLIP).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def train_step():
    yield from _bench_module("train_step")


@pytest.fixture(scope="module")
def tiny_clip():
    """tiny's image tower with a CLIP text tower: random, but its text features do not collapse (the random tiny
    BERT maps every text to nearly one feature, which would leave the distillation terms and gradients at noise
    level). Padding equivalence of the BERT kind is checked at full size by every run of the benchmark."""
    from biovlm.backbone import load_backbone

    return load_backbone("tiny-clip")


def test_reference_pattern_gives_the_project_loss_and_gradient(train_step, tiny_clip):
    images, labels = train_step.batch_images(28, 12)
    method, views, reference, labels = train_step.build_pair(tiny_clip, 3, images, labels)
    with torch.no_grad():  # a spread-out bank, so that routing picks distinct members per image
        method.ctx.mul_(40)
        reference.ctx.copy_(method.ctx)
    batch = train_step.cache_features(tiny_clip, views, labels)
    assert reference.prompt_ids.shape[1] == tiny_clip.context_length  # padded, unlike the project's prompts

    ours, stats = method.loss(batch)
    theirs, ref_stats = reference.loss(views, labels)
    for term in ("ce", "ent", "kd", "aug", "cos"):
        assert ref_stats[term] == pytest.approx(stats[term], rel=1e-4), term
    assert min(stats["kd"], stats["aug"], stats["cos"]) > 1e-3  # no term is vanishingly small
    ours.backward()
    theirs.backward()
    assert method.ctx.grad.abs().max() > 1e-3
    torch.testing.assert_close(reference.ctx.grad, method.ctx.grad, rtol=1e-3, atol=1e-6)

    # one SGD step each keeps them together
    train_step.sgd(method.parameters()).step()
    train_step.sgd(reference.parameters()).step()
    after, _ = method.loss(batch)
    ref_after, _ = reference.loss(views, labels)
    assert ref_after.item() == pytest.approx(after.item(), rel=1e-4)
    assert after.item() != pytest.approx(ours.item(), rel=1e-6)  # the step changed the bank

    # the public implementation's KL scaling (summed KL / (B * M * C) instead of / B) agrees too
    with torch.no_grad():
        _, batchmean = method.loss(batch)
        method.knobs["kl_reduction"] = reference.knobs["kl_reduction"] = "reference"
        _, stats = method.loss(batch)
        _, ref_stats = reference.loss(views, labels)
    assert stats["kd"] == pytest.approx(batchmean["kd"] / (10 * 11), rel=1e-5)
    assert ref_stats["kd"] == pytest.approx(stats["kd"], rel=1e-4)


@pytest.fixture(scope="module")
def demo_bench():
    yield from _bench_module("demo")


def _fake_metrics(folder: Path, coop16: float) -> None:
    import json

    def acc(v):
        return {"average": {"accuracy": {"mean": v, "std": 0.0}}}

    (folder / "detail").mkdir(parents=True)
    fewshot = {"zeroshot": {"k1": acc(60.04), "k16": acc(60.04)}, "coop": {"k1": acc(80.0), "k16": acc(coop16)},
               "biovlm": {"k1": acc(85.0), "k16": acc(90.0)}, "linear_probe": {"k1": acc(70.0), "k16": acc(95.0)}}
    summary = {"fewshot": {}, "base2new": {"zeroshot": 50.0, "coop": 55.5, "biovlm": 60.0},
               "crossdata": {"zeroshot": 40.0, "coop": 35.0, "biovlm": 38.0}}
    (folder / "detail" / "fewshot.json").write_text(json.dumps(fewshot))
    (folder / "summary.json").write_text(json.dumps(summary))


def test_demo_figures_come_from_the_metrics_and_replace_the_readme_block(demo_bench, tmp_path, monkeypatch):
    _fake_metrics(tmp_path / "metrics", coop16=79.0)
    acc = demo_bench.demo_accuracy(tmp_path / "metrics")
    assert acc["chance"] == 20.2 and acc["zeroshot"] == {"k1": 60.0, "k16": 60.0, "base2new": 50.0,
                                                         "crossdata": 40.0}
    assert acc["linear_probe"] == {"k1": 70.0, "k16": 95.0}  # no base2new or crossdata: not applicable
    checks = {"zero-shot above chance": True, "coop gains from K=1 to K=16": False}

    readme = tmp_path / "README.md"
    start, end = "<!-- demo-figures:start (written by bench/demo.py) -->", "<!-- demo-figures:end -->"
    readme.write_text(f"intro\n{start}\nold numbers\n{end}\noutro\n")
    monkeypatch.setattr(demo_bench, "REPO", tmp_path)
    monkeypatch.setattr(demo_bench, "FIGURES", tmp_path / "docs" / "demo.md")
    env = {"machine": {"processor": "Test CPU", "cores": 2, "python": "3.11.7", "platform": "Linux"},
           "packages": {"torch": "2.14.1"}, "git_commit": "0123456789abcdef"}
    fig = {"accuracy": acc, "learning": checks, "seconds": 250.4, "stage_groups_s": {"train": 200.0},
           "environment": env}
    demo_bench.write_figures(fig)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n")
    assert text.endswith(f"{end}\noutro\n") and f"{start}\n| method |" in text
    assert "| coop | 80.0 | 79.0 | 55.5 | 35.0 |" in text and "| linear_probe | 70.0 | 95.0 | n/a | n/a |" in text
    assert "took 250 s on Test CPU (2 cores), commit 0123456789ab" in text
    page = (tmp_path / "docs" / "demo.md").read_text()
    assert "- **not met**: coop gains from K=1 to K=16" in page and "- met: zero-shot above chance" in page
    assert "- packages: torch 2.14.1" in page
    demo_bench.write_figures(fig)  # idempotent: the block is replaced, not appended
    assert readme.read_text() == text


def test_demo_learning_reads_every_results_file(demo_bench, tmp_path):
    """The checks come from the per-dataset, per-seed rows of every results table, results/<dataset>/<method>.csv
    as the train stages write them (biovlm.learning_checks)."""
    rows = [{"method": m, "setting": "fewshot", "source": ds, "target": ds, "shots": k, "seed": seed, "part": "all",
             "n_classes": n, "n": 100, "accuracy": acc, "macro_f1": 0.0, "auc": 0.0, "ece": 0.0}
            for ds, n in (("breastmnist", 2), ("bloodmnist", 8)) for seed in (1, 2)
            for m, k, acc in (("zeroshot", 1, 70.0), ("zeroshot", 16, 70.0), ("coop", 1, 75.0), ("coop", 16, 80.0),
                              ("biovlm", 1, 80.0), ("biovlm", 16, 79.0))]
    results = tmp_path / "results"
    frame = pd.DataFrame(rows)
    for (ds, method), part in frame.groupby(["target", "method"]):
        (results / ds).mkdir(parents=True, exist_ok=True)
        part.to_csv(results / ds / f"{method}.csv", index=False)
        (results / ds / "environment.json").write_text("{}")  # not a results table: ignored
    checks = demo_bench.demo_learning(results)
    assert checks == {
        "zero-shot 38.8 points above chance on average (>= 10), above it on 2 of 2 datasets (>= 2)": True,
        "coop at K=16 10.0 points above zero-shot on average (>= 5), above it on 2 of 2 datasets (>= 1)": True,
        "biovlm at K=16 9.0 points above zero-shot on average (>= 5), above it on 2 of 2 datasets (>= 1)": True,
        "coop gains 5.0 points from K=1 to K=16 on average (>= 2)": True,
        "biovlm at K=1 10.0 points above zero-shot on average (>= 5)": True,
        "biovlm at K=16 -1.0 points from K=1 on average (>= -2)": True}


@pytest.fixture(scope="module")
def scaling():
    yield from _bench_module("scaling")


def test_scaling_projects_the_grid_from_the_measured_costs(scaling):
    estimate = {"features_h": 10.0, "train_eval_h": 100.0,
                "per_method": {"coop": {"runs": 10, "train_h": 4.0, "validation_h": 0.5, "evaluation_h": 0.5},
                               "zeroshot": {"runs": 10, "train_h": 0.0, "validation_h": 0.0, "evaluation_h": 1.0}}}
    rows = {r["workers"]: r for r in scaling.project(estimate, efficiency=0.8)}
    assert rows[1] == {"workers": 1, "train_eval_h": 100.0, "total_h": 110.0}  # one worker: no efficiency loss
    assert rows[2]["train_eval_h"] == round(100.0 / (2 * 0.8), 1) and rows[2]["total_h"] == round(10 + 62.5, 1)
    # never faster than the longest single run (coop: 5 h over 10 runs = 0.5 h): 100 / (16 x 0.8) = 7.8 h
    assert rows[16]["train_eval_h"] == 7.8
    tiny = {**estimate, "train_eval_h": 1.0}
    assert {r["workers"]: r["train_eval_h"] for r in scaling.project(tiny, 1.0)}[16] == 0.5


def test_scaling_prepares_the_demo_as_dvc_exp_run_composes_it(scaling, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(scaling.subprocess, "run", lambda cmd, **kw: calls.append(cmd[2:]))
    cfg = scaling.prepare(tmp_path)
    assert cfg["_profile"] == "demo" and cfg["backbone"]["name"] == "tiny-pretrained" and cfg["data"]["synthetic"]
    assert calls[-3:] == [["stages.attributes"], ["stages.features"], ["stages.filter"]]
    assert len(calls) == len(cfg["datasets"]) + 3


@pytest.fixture(scope="module")
def mutation():
    yield from _bench_module("mutation")


def test_mutation_figures_name_the_full_run_they_time(mutation):
    """The time of a run from an empty mutants/ is printed with its mutant count and commit, so an incremental
    run's table never passes an older, smaller run's time off as its own."""
    rows = [{"module": "biovlm/plan.py", "mutants": 10, "killed": 9, "survived": 1, "other": 0, "not_checked": 0,
             "rate": 0.9, "target": 0.9, "met": True}]
    full = {"seconds": 2843.4, "mutants": 5626, "commit": "ffa74f58595085a645940b30"}
    text = mutation.markdown(rows, full, "Machine: m.")
    assert "| `biovlm/plan.py` | 10 | 9 | 1 | 0 | 90.0 | 90 | yes |" in text
    assert "The last run from an empty `mutants/` (5626 mutants, commit ffa74f585950): 47.4 minutes." in text
    assert "minutes" not in mutation.markdown(rows, None, "Machine: m.")
    unfinished = [{**rows[0], "other": 4, "not_checked": 4}]
    assert "An interrupted run: 4 mutants not checked yet" in mutation.markdown(unfinished, None, "Machine: m.")
