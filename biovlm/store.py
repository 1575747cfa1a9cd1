"""The run store: every finished run's result kept under the hash of everything it depends on, outside DVC's outputs.

DVC restores a stage's outputs from its last lock before the stage runs under ``dvc exp run``, and a queued
experiment (``dvc exp run --queue``) runs in an empty copy of the workspace: a result kept only in ``checkpoints/``
is lost in both cases. The store is a folder outside every DVC output, shared by the workspace, its queued
experiments, other branches and reruns after a crash:

    <root>/<hash[:2]>/<hash>.pt      one run: {"hash", "run", "method", "checkpoint", "history", "rows", "features"}

``hash`` is ``biovlm.plan.run_hash`` (method and training values, the run, the bytes of its inputs and the code), so a
stored result is valid for exactly one computation and is never updated, only added: writes go through a temporary
file renamed into place (``biovlm.storage.atomic_write``), so concurrent writers (``dvc queue start -j 2``) at worst
write the same bytes twice. A damaged entry is reported, removed and recomputed.

Where: ``$BIOVLM_RUN_STORE`` when set, else ``<repository>/.biovlm/runs``, where the repository is ``$DVC_ROOT``
(which DVC sets to the parent repository for the stages of a queued experiment) or the working directory (the
stages run at the repository root). ``.biovlm/`` is ignored by git and DVC. Delete it to forget every result.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from biovlm import storage


def default_root() -> Path:
    """``$BIOVLM_RUN_STORE``, else ``<$DVC_ROOT or the working directory>/.biovlm/runs``."""
    if os.environ.get("BIOVLM_RUN_STORE"):
        return Path(os.environ["BIOVLM_RUN_STORE"])
    return Path(os.environ.get("DVC_ROOT") or ".") / ".biovlm" / "runs"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename: never a half-written file. A full disk
    (checked first, or met mid-write) is a ``storage.DiskFullError``; the file at ``path`` is then untouched."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # closed on failure too: torch's writer would keep a failed file's space taken
            torch.save(obj, f)

    storage.atomic_write(path, write, storage.estimated_bytes(obj), f"writing {path.name}")


def load_if_current(path: Path, expected_hash: str) -> dict | None:
    """The saved run at ``path`` if it holds ``expected_hash``; None if absent, stale or unreadable."""
    import torch

    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a file from another version or damaged: redo the run
        return None
    return state if isinstance(state, dict) and state.get("hash") == expected_hash else None


class RunStore:
    """Results by hash in ``root`` (see the module docstring)."""

    def __init__(self, root: str | Path | None = None, echo=print):
        self.root = Path(root) if root is not None else default_root()
        self.echo = echo

    def path(self, run_hash: str) -> Path:
        return self.root / run_hash[:2] / f"{run_hash}.pt"

    def get(self, run_hash: str) -> dict | None:
        """The stored result of ``run_hash``, or None; a damaged entry is removed (and recomputed by the caller)."""
        path = self.path(run_hash)
        if not path.exists():
            return None
        state = load_if_current(path, run_hash)
        if state is None:
            self.echo(f"run store: {path} is damaged or not the result of its hash; removed, the run is redone")
            path.unlink(missing_ok=True)
        return state

    def put(self, run_hash: str, state: dict) -> Path:
        """Store ``state`` (which must hold ``hash`` = ``run_hash``) atomically; returns its path."""
        if state.get("hash") != run_hash:
            raise ValueError(f"run store: a state holding hash {state.get('hash')!r} cannot be stored as {run_hash}")
        path = self.path(run_hash)
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.remove_stale_temporaries(path.parent)
        atomic_save(state, path)
        return path
