"""The demo's promise as robust checks: averages over datasets and shares of datasets, each threshold exact."""

from __future__ import annotations

import pandas as pd
import pytest

from biovlm.learning_checks import chance_levels, learning_checks, seed_means

DATASETS = ("a", "b", "c", "d")
CHANCE = pd.Series({"a": 50.0, "b": 50.0, "c": 25.0, "d": 25.0})


def means(**per_method: tuple[list[float], list[float]]) -> pd.Series:
    """Seed-mean accuracy by (method, shots, target) from {method: (K=1 values, K=16 values)} over DATASETS."""
    index, values = [], []
    for method, (k1, k16) in per_method.items():
        for k, accs in ((1, k1), (16, k16)):
            for ds, acc in zip(DATASETS, accs, strict=True):
                index.append((method, k, ds))
                values.append(acc)
    return pd.Series(values, index=pd.MultiIndex.from_tuples(index, names=["method", "shots", "target"]))


GOOD = {"zeroshot": ([60.0, 60.0, 35.0, 35.0], [60.0, 60.0, 35.0, 35.0]),
        "coop": ([62.0, 61.0, 40.0, 40.0], [70.0, 68.0, 45.0, 30.0]),
        "biovlm": ([70.0, 66.0, 40.0, 40.0], [69.0, 65.0, 42.0, 38.0])}


def test_checks_name_their_numbers_and_pass_on_clear_learning():
    checks = learning_checks(means(**GOOD), CHANCE)
    assert checks == {
        "zero-shot 10.0 points above chance on average (>= 10), above it on 4 of 4 datasets (>= 4)": True,
        "coop at K=16 5.8 points above zero-shot on average (>= 5), above it on 3 of 4 datasets (>= 2)": True,
        "biovlm at K=16 6.0 points above zero-shot on average (>= 5), above it on 4 of 4 datasets (>= 2)": True,
        "coop gains 2.5 points from K=1 to K=16 on average (>= 2)": True,
        "biovlm at K=1 6.5 points above zero-shot on average (>= 5)": True,
        "biovlm at K=16 -0.5 points from K=1 on average (>= -2)": True}


@pytest.mark.parametrize(("method", "shots", "values", "failing"), [
    # zero-shot 9.75 above chance on average: below the 10-point margin
    ("zeroshot", 16, [60.0, 60.0, 35.0, 34.0], "zero-shot 9.8 points above chance"),
    # above chance on average, but on only 3 of 4 datasets (needs ceil(0.8 * 4) = 4)
    ("zeroshot", 16, [90.0, 40.0, 35.0, 35.0], "above it on 3 of 4 datasets (>= 4)"),
    # CoOp at K=16 beats zero-shot by 4.75 on average
    ("coop", 16, [70.0, 68.0, 45.0, 26.0], "coop at K=16 4.8 points above zero-shot"),
    # CoOp at K=16 far above on average, but above zero-shot on 1 of 4 datasets only
    ("coop", 16, [100.0, 60.0, 35.0, 34.0], "above it on 1 of 4 datasets (>= 2)"),
    # BioVLM loses 2.25 points from K=1 to K=16
    ("biovlm", 16, [68.0, 64.0, 38.0, 37.0], "biovlm at K=16 -2.2 points from K=1 on average (>= -2)"),
])
def test_each_threshold_fails_just_below_it(method, shots, values, failing):
    data = {m: (list(k1), list(k16)) for m, (k1, k16) in GOOD.items()}
    data[method][0 if shots == 1 else 1][:] = values
    checks = learning_checks(means(**data), CHANCE)
    failed = [check for check, ok in checks.items() if not ok]
    assert len(failed) >= 1 and any(failing in check for check in failed), failed


def test_biovlm_must_learn_from_one_shot_and_coop_from_more():
    data = {m: (list(k1), list(k16)) for m, (k1, k16) in GOOD.items()}
    data["biovlm"] = ([64.0, 64.0, 39.0, 38.0], [69.0, 65.0, 42.0, 38.0])  # K=1: 3.75 above zero-shot
    data["coop"] = ([68.0, 68.0, 42.0, 34.0], [70.0, 68.0, 45.0, 30.0])  # gains 0.25 from K=1
    failed = [check for check, ok in learning_checks(means(**data), CHANCE).items() if not ok]
    assert failed == ["coop gains 0.2 points from K=1 to K=16 on average (>= 2)",
                      "biovlm at K=1 3.8 points above zero-shot on average (>= 5)"]


def test_seed_means_average_fewshot_rows_over_seeds_only():
    rows = pd.DataFrame([
        {"method": "coop", "setting": "fewshot", "shots": 1, "target": "a", "seed": 1, "part": "all", "accuracy": 60.0},
        {"method": "coop", "setting": "fewshot", "shots": 1, "target": "a", "seed": 2, "part": "all", "accuracy": 70.0},
        {"method": "coop", "setting": "fewshot", "shots": 1, "target": "b", "seed": 1, "part": "all", "accuracy": 10.0},
        {"method": "coop", "setting": "base2new", "shots": 1, "target": "a", "seed": 1, "part": "base",
         "accuracy": 0.0},
        {"method": "coop", "setting": "crossdata", "shots": 1, "target": "a", "seed": 1, "part": "all",
         "accuracy": 0.0},
    ])
    assert seed_means(rows).to_dict() == {("coop", 1, "a"): 65.0, ("coop", 1, "b"): 10.0}


def test_chance_levels_come_from_the_registry():
    assert chance_levels(["breastmnist", "bloodmnist", "organamnist"]).to_dict() == {
        "breastmnist": 50.0, "bloodmnist": 12.5, "organamnist": 100 / 11}
