"""The run store: results by hash outside DVC's outputs, reused after DVC restores or empties the checkpoints."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_pipeline import fake_inputs, small_config

from biovlm import runs
from biovlm.store import RunStore, default_root

H = "ab" + "0" * 62


def test_a_result_is_stored_under_its_hash_and_read_back(tmp_path):
    store = RunStore(tmp_path / "store")
    assert store.get(H) is None
    state = {"hash": H, "rows": [{"accuracy": 50.0}], "checkpoint": {"tensors": {"ctx": torch.ones(2)}}}
    path = store.put(H, state)
    assert path == tmp_path / "store" / "ab" / f"{H}.pt"
    back = store.get(H)
    assert back["rows"] == state["rows"] and torch.equal(back["checkpoint"]["tensors"]["ctx"], torch.ones(2))
    with pytest.raises(ValueError, match=r"^run store: a state holding hash 'x' cannot be stored as ab0+$"):
        store.put(H, {"hash": "x"})


def test_a_damaged_or_foreign_entry_is_removed_and_redone(tmp_path):
    lines: list[str] = []
    store = RunStore(tmp_path, echo=lines.append)
    store.put(H, {"hash": H, "rows": []})
    store.path(H).write_bytes(b"PK\3\4 cut short")
    assert store.get(H) is None and not store.path(H).exists()
    assert lines == [f"run store: {store.path(H)} is damaged or not the result of its hash; removed, the run is redone"]
    torch.save({"hash": "other", "rows": []}, store.path(H))  # a file renamed by hand
    assert store.get(H) is None and not store.path(H).exists()


def test_the_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("BIOVLM_RUN_STORE", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    assert default_root() == Path(".biovlm/runs")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "repo"))  # a queued experiment's stage: the parent repository
    assert default_root() == tmp_path / "repo" / ".biovlm" / "runs"
    monkeypatch.setenv("BIOVLM_RUN_STORE", str(tmp_path / "elsewhere"))
    assert default_root() == tmp_path / "elsewhere"


@pytest.fixture(scope="module")
def inputs(tiny_backbone):
    return {ds: fake_inputs(ds, tiny_backbone.embed_dim) for ds in ("breastmnist", "bloodmnist")}


def test_runs_lost_with_the_checkpoints_come_back_from_the_store(tiny_backbone, inputs, tmp_path, monkeypatch):
    """What `dvc exp run` does to a persisted output (restores it from the last lock) or a queued workspace (starts
    it empty): the checkpoints are gone, the store still has every run."""
    cfg = small_config(settings=["fewshot", "base2new", "crossdata"], **{"crossdata.sources": ["bloodmnist"]})
    store, out = RunStore(tmp_path / "store", echo=lambda s: None), tmp_path / "checkpoints"
    lines: list[str] = []
    first = runs.run_method("coop", cfg, tiny_backbone, inputs, out, echo=lines.append, store=store)
    n = len(runs.plan_runs(cfg))
    assert lines[-2].startswith(f"coop: {n} runs ({n} trained, 0 reused, 0 of them from the run store)")
    stored = sorted(p.name for p in (tmp_path / "store").rglob("*.pt"))
    assert len(stored) == n + len(cfg["seeds"])  # every run and every cross-dataset evaluation
    shutil.rmtree(out)
    calls = []
    monkeypatch.setattr(runs, "train_and_evaluate", lambda *a, **k: calls.append(a) or pytest.fail("retrained"))
    monkeypatch.setattr(runs, "cross_evaluate", lambda *a, **k: calls.append(a) or pytest.fail("re-evaluated"))
    lines.clear()
    again = runs.run_method("coop", cfg, tiny_backbone, inputs, out, echo=lines.append, store=store)
    assert calls == [] and again.equals(first)
    assert lines[-2].startswith(f"coop: {n} runs (0 trained, {n} reused, {n} of them from the run store)")
    assert len(list(out.rglob("*.pt"))) == n + len(cfg["seeds"])  # the DVC output is rebuilt from the store


def test_concurrent_writers_of_one_hash_leave_one_valid_entry(tmp_path):
    """`dvc queue start -j 2`: two experiments finishing the same run write the same entry at the same time."""
    code = ("import sys, torch; from biovlm.store import RunStore; s = RunStore(sys.argv[1]); h = sys.argv[2]\n"
            "for i in range(20): s.put(h, {'hash': h, 'rows': [], 'big': torch.arange(200000)})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), H]) for _ in range(2)]
    assert [p.wait() for p in procs] == [0, 0]
    state = RunStore(tmp_path).get(H)
    assert state is not None and torch.equal(state["big"], torch.arange(200000))
    assert [p.name for p in (tmp_path / "ab").iterdir()] == [f"{H}.pt"]  # no temporary file left
