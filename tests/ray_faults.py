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
        if os.environ.get("BIOVLM_TEST_KILL_ALWAYS") or not marker.exists():
            with open(marker, "a") as f:
                f.write(f"{os.getpid()}\n")
            os.kill(os.getpid(), signal.SIGKILL)
        return train_and_evaluate(*args, **kwargs)

    runs.train_and_evaluate = killing
