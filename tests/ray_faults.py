"""A Ray worker setup hook for tests/test_executors.py: the first run any worker starts kills that worker's process
(SIGKILL, as the OOM killer or a preempted node would), once per marker file ``$BIOVLM_TEST_KILL_MARKER``; with
``$BIOVLM_TEST_KILL_ALWAYS`` set, every run does."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def kill_first_run() -> None:
    from biovlm import runs

    marker = Path(os.environ["BIOVLM_TEST_KILL_MARKER"])
    train_and_evaluate = runs.train_and_evaluate

    def killing(*args, **kwargs):
        # Claiming the marker is atomic (O_EXCL): two workers starting their first runs together must not both see
        # no marker and both die (a check-then-write race that killed two workers in CI).
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if os.environ.get("BIOVLM_TEST_KILL_ALWAYS") else os.O_EXCL)
        try:
            fd = os.open(marker, flags)
        except FileExistsError:
            return train_and_evaluate(*args, **kwargs)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)

    runs.train_and_evaluate = killing
