"""One experiment at a time in a workspace: the stages of two concurrent ``dvc exp run`` stop with a message instead
of mixing their values.

``dvc exp run`` prepares the workspace *before* any stage runs and without waiting for a running experiment: it
rewrites ``params.yaml`` with its ``-S`` values and resets the outputs it has no record of (deleting what the running
experiment's current stage is writing). Nothing a stage does can prevent that, so both experiments are then void.
What this module makes sure of is that neither continues with mixed values and that both say why:

- the first stage of an experiment records its name (``DVC_EXP_NAME``, set by DVC), the pid of the ``dvc`` process
  that runs it (found through ``/proc``) and the digest of ``params.yaml`` in ``.dvc/tmp/biovlm-experiment.json``;
- a stage of another experiment while that ``dvc`` process still runs stops at once ("another `dvc exp run` is
  running in this workspace");
- every later stage of the recorded experiment checks that ``params.yaml`` still has the recorded digest, and stops
  when the other run rewrote it.

Concurrent experiments belong in DVC's queue (``dvc exp run --queue`` then ``dvc queue start -j N``), which runs each
in its own copy. Outside ``dvc exp run`` (``dvc repro``, tests, library use), or where there is no ``/proc``, nothing
is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from biovlm import storage

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
    other = seen.get("dvc_pid")
    another = (seen.get("experiment"), other) != (name, runner)
    if another and isinstance(other, int) and storage.process_running(other):
        raise ConcurrentExperimentError(
            f"another `dvc exp run` ({seen.get('experiment')}, dvc pid {other}) is running in this workspace; DVC has "
            f"already rewritten {params} and reset outputs for this one ({name}), so both runs are void: let it end "
            f"(or stop it), restore {params} (git diff {params}) and rerun; to run experiments side by side use "
            f"`dvc exp run --queue` and `dvc queue start`")
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
