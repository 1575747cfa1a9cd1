"""Executors: where a stage computes its pending runs. Results do not depend on the executor.

The stage decides which runs are pending (neither their checkpoint file nor the run store holds them) and stores
each result as soon as it comes back (``biovlm.runs.run_methods``); an executor only computes. ``executor.kind`` in
params.yaml chooses one:

- ``local`` (default): one run after the other in the stage's own process, with the backbone it loaded.
- ``ray``: on Ray workers, each a process that loads the backbone once and keeps it (one per GPU, or a fraction of
  one with ``gpus_per_worker: 0.5``; CPU workers on a machine without GPUs). ``address: null`` starts a Ray instance
  on this machine for the stage; ``address: auto`` (or ``ray://<head>:10001``) joins a running cluster, e.g. one
  started with ``ray start`` on SLURM or cloud nodes. A worker killed mid-run is restarted and its run retried
  (``retries`` times); a driver killed mid-stage loses nothing already stored.

Every worker must compute what the stage would: each reports the hash of its training code and its backbone's
weights before it gets a run, and the stage refuses a worker that differs (another checkout on a cluster node).
Ray is an optional extra (``pip install -e '.[ray]'``); the local executor needs nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from biovlm import plan, runs
from biovlm.runs import DatasetInputs, Task

Result = tuple[Task, dict, float]  # (task, its state, seconds it took)
TaskLog = Callable[[Task, dict, int], None]  # (task, epoch record, epoch)


@dataclass(frozen=True)
class ExecutorSettings:
    """params.yaml ``executor:`` (see the module docstring)."""

    kind: str = "local"  # local | ray
    address: str | None = None  # ray: null starts a Ray instance here; "auto" or "ray://host:port" joins one
    workers: int | None = None  # ray: null = one per GPU (gpus_per_worker each), else one per cpus_per_worker CPUs
    gpus_per_worker: float = 1.0  # ray: fractions share a GPU; ignored where the cluster has no GPU
    cpus_per_worker: float = 1.0  # ray: also the worker's torch threads unless backbone.threads is set
    retries: int = 2  # ray: a worker killed mid-run is restarted and the run retried this many times
    runtime_env: dict | None = None  # ray: e.g. {working_dir: .} so cluster nodes run this checkout

    @classmethod
    def from_config(cls, cfg: Mapping) -> ExecutorSettings:
        section = dict(cfg.get("executor") or {})
        return cls(**{f.name: section[f.name] for f in fields(cls) if f.name in section})


def make_executor(cfg: Mapping, inputs: Mapping[str, DatasetInputs], load_backbone: Callable[[], Any]):
    """The executor params.yaml asks for; ``load_backbone()`` loads the backbone in this process (local only)."""
    settings = ExecutorSettings.from_config(cfg)
    if settings.kind == "ray":
        return RayExecutor(cfg, inputs, settings)
    return LocalExecutor(cfg, load_backbone(), inputs)


def worker_identity(backbone) -> dict:
    """What must agree between a worker and the stage: the training code and the backbone's weights."""
    from biovlm import environment

    return {"code": plan.code_digest(), "weights_sha256": backbone.fingerprint,
            "environment": environment.describe(str(backbone.device), backbone)}


class LocalExecutor:
    """Runs in this process, in the order given, with per-epoch curves logged as training goes."""

    def __init__(self, cfg: Mapping, backbone, inputs: Mapping[str, DatasetInputs]):
        self.backbone = backbone
        self.worker = runs.Worker(cfg, backbone, inputs)

    def describe(self) -> str:
        return f"this process ({self.backbone.device})"

    def identity(self) -> dict:
        return worker_identity(self.backbone)

    def map(self, tasks: Sequence[Task], log: TaskLog | None = None) -> Iterator[Result]:
        for task in tasks:
            t0 = time.perf_counter()
            run_log = (lambda record, epoch, _task=task: log(_task, record, epoch)) if log else None
            yield task, self.worker.run(task, run_log), time.perf_counter() - t0

    def close(self) -> None:
        pass


class _RayWorker:
    """One Ray worker process: loads the backbone once, then computes the runs it is sent."""

    def __init__(self, cfg: Mapping, inputs: Mapping[str, DatasetInputs], threads: int):
        import ray
        import torch

        from biovlm.backbone import load_backbone

        torch.set_num_threads(threads)
        device = "cuda" if ray.get_gpu_ids() else "cpu"  # Ray makes the worker's GPU(s) the visible ones
        b = cfg["backbone"]
        self.backbone = load_backbone(b["name"], device=device, cache_dir=b["cache_dir"])
        self.worker = runs.Worker(cfg, self.backbone, inputs)

    def identity(self) -> dict:
        return {**worker_identity(self.backbone), "pid": os.getpid()}

    def run(self, task: Task) -> Result:
        t0 = time.perf_counter()
        return task, self.worker.run(task), time.perf_counter() - t0


class RayExecutor:
    """Runs on Ray workers, as many at once as there are workers; results come back as they finish."""

    def __init__(self, cfg: Mapping, inputs: Mapping[str, DatasetInputs], settings: ExecutorSettings):
        try:
            import ray
        except ImportError:
            raise RuntimeError("executor.kind is ray but Ray is not installed; pip install -e '.[ray]' "
                               "(or set executor.kind: local)") from None
        self.ray, self.settings = ray, settings
        self.started_here = not ray.is_initialized()
        if self.started_here:
            ray.init(address=settings.address, runtime_env=self._runtime_env(), include_dashboard=False,
                     configure_logging=False, log_to_driver=True)
        resources = ray.cluster_resources()
        gpus = settings.gpus_per_worker if resources.get("GPU", 0) > 0 else 0
        capacity = resources.get("GPU", 0) / gpus if gpus else resources.get("CPU", 0) / settings.cpus_per_worker
        n = settings.workers or max(1, int(capacity))
        if n > capacity + 1e-9:
            self.close()
            have = f"{resources.get('GPU', 0):g} GPU(s)" if gpus else f"{resources.get('CPU', 0):g} CPU(s)"
            raise ValueError(f"executor.workers = {n} do not fit the Ray cluster ({have}, "
                             f"{gpus or settings.cpus_per_worker:g} per worker); lower executor.workers or "
                             f"executor.{'gpus' if gpus else 'cpus'}_per_worker")
        threads = int(cfg["backbone"].get("threads") or max(1, int(settings.cpus_per_worker)))
        actor = ray.remote(_RayWorker).options(num_cpus=settings.cpus_per_worker, num_gpus=gpus,
                                               max_restarts=settings.retries, max_task_retries=settings.retries)
        # once into the object store, for every worker; held here, as a restarted worker reads it again
        self.shared_inputs = ray.put(dict(inputs))
        self.workers = [actor.remote(cfg, self.shared_inputs, threads) for _ in range(n)]
        self._check_workers()
        where = f"{resources.get('GPU', 0):g} GPU(s)" if gpus else "CPUs"
        self.description = f"{n} Ray worker(s) ({where}, {settings.address or 'a local Ray instance'})"

    def _runtime_env(self) -> dict:
        """The user's ``runtime_env``; on this machine the workers also import this checkout's ``biovlm``."""
        env = dict(self.settings.runtime_env or {})
        if self.settings.address is None:
            here = str(Path(runs.__file__).resolve().parents[1])
            paths = [here, *filter(None, [os.environ.get("PYTHONPATH")])]
            env["env_vars"] = {"PYTHONPATH": os.pathsep.join(paths), **(env.get("env_vars") or {})}
        return env

    def _check_workers(self) -> None:
        try:
            identities = self.ray.get([w.identity.remote() for w in self.workers])
        except self.ray.exceptions.RayError as e:
            self.close()
            raise RuntimeError(f"a Ray worker failed to start: {_cause(e)}") from None
        expected = plan.code_digest()
        for ident in identities:
            if ident["code"] != expected:
                self.close()
                raise RuntimeError(f"a Ray worker (pid {ident['pid']}) runs other biovlm code than this checkout; "
                                   f"install this checkout on every node or set executor.runtime_env.working_dir")
            if ident.get("weights_sha256") != identities[0].get("weights_sha256"):
                self.close()
                raise RuntimeError(f"Ray workers loaded different backbone weights (sha256 "
                                   f"{identities[0].get('weights_sha256')} and {ident.get('weights_sha256')}, pid "
                                   f"{ident['pid']}); give every node the same Hugging Face cache (backbone.cache_dir)")
        self.identities = identities  # the stage checks the first's weights against the feature files

    def describe(self) -> str:
        return self.description

    def identity(self) -> dict:
        return self.identities[0]

    def map(self, tasks: Sequence[Task], log: TaskLog | None = None) -> Iterator[Result]:
        """Results as they finish; each worker gets its next run when it returns one. Curves are logged per run
        from its history when it comes back."""
        ray, queue = self.ray, list(tasks)[::-1]
        running: dict[Any, tuple[Any, Task]] = {}

        def submit(worker) -> None:
            if queue:
                task = queue.pop()
                running[worker.run.remote(task)] = (worker, task)

        for worker in self.workers:
            submit(worker)
        while running:
            [ref], _ = ray.wait(list(running), num_returns=1)
            worker, task = running.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the run itself failed: its own error, as local would raise
                raise e.cause if isinstance(e.cause, Exception) else RuntimeError(str(e)) from None
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"{task.method} {task.run.name}: the Ray worker died "
                                   f"{self.settings.retries + 1} time(s) ({_cause(e)}); every finished run is "
                                   f"stored, rerun the stage to continue") from None
            submit(worker)
            if log is not None:
                for record in result[1]["history"].get("epochs", []):
                    log(task, record, record["epoch"])
            yield result

    def close(self) -> None:
        if self.started_here and self.ray.is_initialized():
            self.ray.shutdown()


def _cause(error: Exception) -> str:
    return str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
