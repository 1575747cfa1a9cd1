"""One experiment at a time in a workspace: the stages of a ``dvc exp run`` refuse a ``params.yaml`` that changed
under them.

``dvc exp run -S key=value`` writes ``params.yaml`` *before* it takes DVC's repository lock, so a second
``dvc exp run`` started in the same workspace rewrites the file while the first is still running; the second then
fails on the lock, and the first's remaining stages would read the second's values and leave a ``dvc.lock`` mixing
both. DVC gives its stage commands the experiment's name (``DVC_EXP_NAME``); the first stage of an experiment
records the digest of ``params.yaml`` with that name and the pid of the ``dvc`` process that runs it
(``.dvc/tmp/biovlm-experiment.json``), and every later stage of the same process checks the file still has that
digest. A changed file stops the run with a message naming what happened and the fix. Concurrent experiments
belong in DVC's queue (``dvc exp run --queue`` then ``dvc queue start``), which runs each in its own copy.

Outside ``dvc exp run`` (``dvc repro``, tests, library use) nothing is checked. The ``dvc`` process is found
through ``/proc`` (Linux); elsewhere each stage counts as its own run and nothing is checked either.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

RECORD = Path(".dvc") / "tmp" / "biovlm-experiment.json"


class ConcurrentExperimentError(RuntimeError):
    """params.yaml changed while the stages of one ``dvc exp run`` were running."""


def dvc_pid(pid: int | None = None) -> int | None:
    """The pid of the nearest ancestor process running ``dvc`` (None without /proc or without one)."""
    pid = os.getpid() if pid is None else pid
    for _ in range(32):  # a few levels: python <- sh <- dvc
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # field 4, after the parenthesised command name
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            return None
        if pid <= 1:
            return None
        if any(Path(a.decode(errors="replace")).name in ("dvc", "dvc.exe") for a in argv[:2]) or (
                len(argv) > 2 and argv[1] == b"-m" and argv[2] == b"dvc"):
            return pid
    return None


def check_params(params: str | Path, record: str | Path = RECORD, environ: dict | None = None,
                 runner: int | None = None) -> None:
    """Record or check the digest of ``params`` for the running ``dvc exp run`` (see the module docstring)."""
    environ = os.environ if environ is None else environ
    name = environ.get("DVC_EXP_NAME")
    runner = dvc_pid() if runner is None else runner
    if not name or runner is None:
        return
    digest = hashlib.sha256(Path(params).read_bytes()).hexdigest()
    record = Path(record)
    try:
        seen = json.loads(record.read_text())
    except (OSError, ValueError):
        seen = {}
    if seen.get("experiment") == name and seen.get("dvc_pid") == runner:
        if seen.get("params_sha256") != digest:
            raise ConcurrentExperimentError(
                f"{params} changed while `dvc exp run` {name} (dvc pid {runner}) was running, most likely rewritten "
                f"by a second `dvc exp run` in this workspace; stopping before any stage mixes both. Restore the "
                f"intended values (git diff {params}) and rerun; run experiments side by side with "
                f"`dvc exp run --queue` and `dvc queue start`")
        return
    record.parent.mkdir(parents=True, exist_ok=True)
    tmp = record.with_name(f".{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"experiment": name, "dvc_pid": runner, "params_sha256": digest}) + "\n")
    os.replace(tmp, record)
