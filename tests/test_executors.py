"""Executors (biovlm/executors.py): where pending runs are computed never changes a result, and a run that comes back
is stored at once. The Ray tests start a local Ray instance with CPU workers (skipped without the ``ray`` extra)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import COMMITTED_PARAMS
from test_pipeline import DATASETS2, fake_inputs, small_config

from biovlm import runs
from biovlm.config import ConfigError, load_config
from biovlm.executors import ExecutorSettings, LocalExecutor, make_executor
from biovlm.store import RunStore

QUIET = {"echo": lambda line: None}
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def inputs(tiny_backbone):
    return {ds: fake_inputs(ds, tiny_backbone.embed_dim) for ds in DATASETS2}


def config(**overrides) -> dict:
    """The runs of the fast tests, on the ``tiny`` backbone (what each Ray worker loads for itself)."""
    return small_config(**{"backbone.name": "tiny", "settings": ["fewshot", "base2new"],
                           "seeds": [1], **overrides})


def test_settings_come_from_params_with_defaults():
    assert ExecutorSettings.from_config({}) == ExecutorSettings()
    assert ExecutorSettings().kind == "local" and ExecutorSettings().retries == 2
    s = ExecutorSettings.from_config({"executor": {"kind": "ray", "workers": 3, "gpus_per_worker": 0.5}})
    assert (s.kind, s.workers, s.gpus_per_worker, s.address) == ("ray", 3, 0.5, None)
    assert load_config(COMMITTED_PARAMS)["executor"]["kind"] == "local"  # the committed default needs no Ray


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("executor.kind", "slurm", "one of local, ray"),
    ("executor.workers", 0, "null or a positive integer"),
    ("executor.gpus_per_worker", -1, "a number >= 0"),
    ("executor.retries", 1.5, "an integer >= 0"),
])
def test_bad_executor_values_are_named(key, value, expected):
    with pytest.raises(ConfigError, match=rf"params.yaml: {key} must be {expected}, got {value!r}"):
        load_config(COMMITTED_PARAMS, {key: value})


def test_the_local_executor_is_the_default(tiny_backbone, inputs):
    executor = make_executor(config(), inputs, lambda: tiny_backbone)
    assert isinstance(executor, LocalExecutor) and executor.describe() == "this process (cpu)"
    assert executor.identity()["weights_sha256"] == tiny_backbone.fingerprint


class Interrupted(Exception):
    pass


class StopsAfter:
    """An executor that computes ``n`` runs locally, then dies as a killed stage would."""

    def __init__(self, local: LocalExecutor, n: int):
        self.local, self.n = local, n

    def describe(self) -> str:
        return "a failing test executor"

    def map(self, tasks, log=None):
        for i, result in enumerate(self.local.map(tasks, log)):
            if i == self.n:
                raise Interrupted
            yield result


def test_each_result_is_stored_as_it_comes_back(tiny_backbone, inputs, tmp_path):
    cfg = config()
    store = RunStore(tmp_path / "store", **QUIET)
    local = LocalExecutor(cfg, tiny_backbone, inputs)
    with pytest.raises(Interrupted):
        runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path / "out", store=store,
                        executor=StopsAfter(local, 3), **QUIET)
    assert len(list((tmp_path / "store").rglob("*.pt"))) == 3
    assert len(list((tmp_path / "out").rglob("*.pt"))) == 3
    lines: list[str] = []
    runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path / "out", store=store, echo=lines.append)
    n = len(runs.plan_runs(cfg))
    assert lines[-1].startswith(f"coop: {n} runs ({n - 3} trained, 3 reused, 0 of them from the run store)")


def test_several_methods_share_one_dispatch(tiny_backbone, inputs, tmp_path):
    cfg = config()
    seen: list[list[str]] = []

    class Recording(LocalExecutor):
        def map(self, tasks, log=None):
            seen.append([t.method for t in tasks])
            return super().map(tasks, log)

    out = {m: tmp_path / m for m in ("zeroshot", "coop")}
    lines: list[str] = []
    states = runs.run_methods(list(out), cfg, inputs, out, Recording(cfg, tiny_backbone, inputs), echo=lines.append,
                              datasets=["bloodmnist"])
    n = len([r for r in runs.plan_runs(cfg) if r.dataset == "bloodmnist"])
    assert seen == [["zeroshot"] * n + ["coop"] * n]  # one call: every worker can be busy
    assert lines[0] == f"{2 * n} of {2 * n} runs to compute on this process (cpu)"
    assert [list(s) for s in states.values()] == [[r for r in runs.plan_runs(cfg) if r.dataset == "bloodmnist"]] * 2


# ---------------------------------------------------------------------------------------------- Ray
def ray_settings(**kw) -> ExecutorSettings:
    return ExecutorSettings(kind="ray", workers=2, cpus_per_worker=1, **kw)


def kill_env(marker: Path, always: bool = False) -> dict:
    env = {"PYTHONPATH": str(TESTS), "BIOVLM_TEST_KILL_MARKER": str(marker)}
    if always:
        env["BIOVLM_TEST_KILL_ALWAYS"] = "1"
    return {"env_vars": env, "worker_process_setup_hook": "ray_faults.kill_first_run"}


def same_states(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for run in a:
        assert pd.DataFrame(a[run]["rows"]).equals(pd.DataFrame(b[run]["rows"])), run.name  # NaN AUCs included
        ta, tb = a[run]["checkpoint"]["tensors"], b[run]["checkpoint"]["tensors"]
        assert list(ta) == list(tb) and all(torch.equal(ta[k], tb[k]) for k in ta), run.name  # bit for bit
        assert a[run]["hash"] == b[run]["hash"]


@pytest.mark.slow
def test_ray_workers_give_the_local_results_bit_for_bit_and_survive_a_killed_worker(tiny_backbone, inputs, tmp_path):
    pytest.importorskip("ray")
    from biovlm.executors import RayExecutor

    cfg = config(**{"backbone.threads": 1})
    methods, threads = ["coop", "biovlm", "linear_probe"], torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' count (backbone.threads): float sums then agree
    try:
        local = runs.run_methods(methods, cfg, inputs, {m: tmp_path / "local" / m for m in methods},
                                 LocalExecutor(cfg, tiny_backbone, inputs), **QUIET)
    finally:
        torch.set_num_threads(threads)
    marker = tmp_path / "killed"
    executor = RayExecutor(cfg, inputs, ray_settings(runtime_env=kill_env(marker)))
    try:
        assert executor.describe() == "2 Ray worker(s) (CPUs, a local Ray instance)"
        assert executor.identity()["weights_sha256"] == tiny_backbone.fingerprint
        lines: list[str] = []
        store = RunStore(tmp_path / "store", **QUIET)
        far = runs.run_methods(methods, cfg, inputs, {m: tmp_path / "ray" / m for m in methods}, executor,
                               echo=lines.append, store=store)
    finally:
        executor.close()
    assert len(marker.read_text().split()) == 1  # one worker was killed mid-run ...
    for m in methods:  # ... and its run retried on the restarted worker: every result is there, as local made it
        same_states(local[m], far[m])
    n = sum(len(s) for s in far.values())
    assert len(list((tmp_path / "store").rglob("*.pt"))) == n
    assert lines[-1].startswith(f"linear_probe: {len(far['linear_probe'])} runs ({len(far['linear_probe'])} trained")


@pytest.mark.slow
def test_a_run_that_kills_every_worker_is_named_and_the_finished_runs_kept(tiny_backbone, inputs, tmp_path):
    pytest.importorskip("ray")
    from biovlm.executors import RayExecutor

    cfg = config()
    executor = RayExecutor(cfg, inputs, ray_settings(retries=1, runtime_env=kill_env(tmp_path / "k", always=True)))
    try:
        with pytest.raises(RuntimeError, match=r"coop fewshot/\w+/k\d_seed1: the Ray worker died 2 time\(s\) .*; "
                                               r"every finished run is stored, rerun the stage to continue"):
            runs.run_method("coop", cfg, tiny_backbone, inputs, tmp_path / "out", executor=executor, **QUIET)
    finally:
        executor.close()


@pytest.mark.slow
def test_more_ray_workers_than_the_machine_has_is_an_error(inputs):
    pytest.importorskip("ray")
    import os

    from biovlm.executors import RayExecutor

    n = (os.cpu_count() or 1) + 1
    with pytest.raises(ValueError, match=rf"executor.workers = {n} do not fit the Ray cluster \(\d+ CPU\(s\), 1 per "
                                         r"worker\); lower executor.workers or executor.cpus_per_worker"):
        RayExecutor(config(), inputs, ExecutorSettings(kind="ray", workers=n))


def test_ray_without_ray_installed_names_the_extra(inputs, monkeypatch):
    import builtins

    from biovlm.executors import RayExecutor

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(RuntimeError, match=r"^executor.kind is ray but Ray is not installed; pip install -e '.\[ray\]' "
                                           r"\(or set executor.kind: local\)$"):
        RayExecutor(config(), inputs, ExecutorSettings(kind="ray"))


def test_a_ray_worker_running_other_code_is_refused_before_any_run():
    """A cluster node with another checkout (or other weights) would store results under hashes of this one:
    refused at start-up."""
    from types import SimpleNamespace

    from biovlm.executors import RayExecutor

    executor = RayExecutor.__new__(RayExecutor)  # no Ray needed: the check reads the workers' reported identities
    closed = []
    executor.started_here, executor.close = False, lambda: closed.append(True)
    executor.workers = [SimpleNamespace(identity=SimpleNamespace(remote=lambda: "ref"))] * 2
    identities = [{"code": runs.code_digest(), "pid": 11, "weights_sha256": "a" * 64},
                  {"code": "0" * 64, "pid": 12, "weights_sha256": "a" * 64}]
    executor.ray = SimpleNamespace(get=lambda refs: identities, exceptions=SimpleNamespace(RayError=RuntimeError))
    with pytest.raises(RuntimeError, match=r"^a Ray worker \(pid 12\) runs other biovlm code than this checkout; "
                                           r"install this checkout on every node or set "
                                           r"executor.runtime_env.working_dir$"):
        executor._check_workers()
    assert closed == [True]
    identities[1].update(code=runs.code_digest(), weights_sha256="b" * 64)  # another node's download
    with pytest.raises(RuntimeError, match=rf"^Ray workers loaded different backbone weights \(sha256 {'a' * 64} and "
                                           rf"{'b' * 64}, pid 12\); give every node the same Hugging Face cache"):
        executor._check_workers()
    identities[1]["weights_sha256"] = "a" * 64
    executor._check_workers()
    assert executor.identity() == identities[0] and closed == [True, True]


def test_a_ray_worker_that_fails_to_start_is_named_in_one_line():
    from types import SimpleNamespace

    from biovlm.executors import RayExecutor

    class RayError(Exception):
        pass

    def get(refs):
        raise RayError("Traceback (most recent call last):\n  ...\nFileNotFoundError: no weights in /cache")

    executor = RayExecutor.__new__(RayExecutor)
    closed = []
    executor.started_here, executor.close = False, lambda: closed.append(True)
    executor.workers = [SimpleNamespace(identity=SimpleNamespace(remote=lambda: "ref"))]
    executor.ray = SimpleNamespace(get=get, exceptions=SimpleNamespace(RayError=RayError))
    with pytest.raises(RuntimeError, match=r"^a Ray worker failed to start: FileNotFoundError: no weights in /cache$"):
        executor._check_workers()
    assert closed == [True]
