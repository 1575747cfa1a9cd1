"""A second `dvc exp run` rewriting params.yaml under a running one is caught before any stage mixes both."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from biovlm.workspace import ConcurrentExperimentError, check_params, dvc_pid


def test_a_changed_params_file_stops_the_same_experiment(tmp_path):
    params, record = tmp_path / "params.yaml", tmp_path / ".dvc" / "tmp" / "rec.json"
    params.write_text("train: {epochs: 50}\n")
    env = {"DVC_EXP_NAME": "exp-1"}
    check_params(params, record, env, runner=4242)  # the first stage records
    assert json.loads(record.read_text())["experiment"] == "exp-1"
    check_params(params, record, env, runner=4242)  # a later stage of the same run: unchanged, fine
    params.write_text("train: {epochs: 5}\n")  # the second `dvc exp run -S train.epochs=5`
    with pytest.raises(ConcurrentExperimentError, match=re.escape(
            f"{params} changed while `dvc exp run` exp-1 (dvc pid 4242) was running, most likely rewritten by a "
            f"second `dvc exp run` in this workspace; stopping before any stage mixes both.")):
        check_params(params, record, env, runner=4242)


def test_a_second_experiment_stops_while_the_first_runs(tmp_path):
    """What a second `dvc exp run` in the same workspace reaches: its first stage, after DVC rewrote params.yaml."""
    params, record = tmp_path / "params.yaml", tmp_path / "rec.json"
    params.write_text("a: 1\n")
    running = os.getppid()  # a live process stands for the first experiment's dvc
    check_params(params, record, {"DVC_EXP_NAME": "exp-1"}, runner=running)
    params.write_text("a: 2\n")
    with pytest.raises(ConcurrentExperimentError, match=re.escape(
            f"another `dvc exp run` (exp-1, dvc pid {running}) is running in this workspace; DVC has already "
            f"rewritten {params} and reset outputs for this one (exp-2), so both runs are void")):
        check_params(params, record, {"DVC_EXP_NAME": "exp-2"}, runner=os.getpid())
    assert json.loads(record.read_text())["experiment"] == "exp-1"  # the record stays the first one's
    with pytest.raises(ConcurrentExperimentError, match="changed while `dvc exp run` exp-1"):
        check_params(params, record, {"DVC_EXP_NAME": "exp-1"}, runner=running)  # and the first stops too


def test_a_new_experiment_or_plain_repro_starts_afresh(tmp_path):
    params, record = tmp_path / "params.yaml", tmp_path / "rec.json"
    params.write_text("a: 1\n")
    finished = subprocess.Popen(["true"])
    finished.wait()
    check_params(params, record, {"DVC_EXP_NAME": "exp-1"}, runner=finished.pid)  # a dvc that has ended
    params.write_text("a: 2\n")
    check_params(params, record, {"DVC_EXP_NAME": "exp-2"}, runner=os.getpid())  # the next experiment records anew
    check_params(params, record, {"DVC_EXP_NAME": "exp-2"}, runner=os.getpid())
    params.write_text("a: 3\n")
    check_params(params, record, {}, runner=os.getpid())  # dvc repro: no experiment, nothing checked
    assert json.loads(record.read_text())["experiment"] == "exp-2"


def test_the_dvc_ancestor_is_found_through_proc(tmp_path):
    if not os.path.exists("/proc/self/stat"):
        pytest.skip("no /proc on this system")
    fake = tmp_path / "dvc"  # a process named dvc that runs python, which asks for its dvc ancestor
    fake.write_text(f"#!/bin/sh\n{sys.executable} -c 'from biovlm.workspace import dvc_pid; print(dvc_pid())'\n"
                    "echo $$\n")
    fake.chmod(0o755)
    out = subprocess.run([str(fake)], capture_output=True, text=True, check=True, cwd=os.getcwd(),
                         env={**os.environ, "PYTHONPATH": os.getcwd()}).stdout.split()
    assert out[0] == out[1]  # the pid python found is the shell script's, called dvc
    assert dvc_pid() is None or dvc_pid() != os.getpid()


def test_load_config_checks_under_dvc_exp_run(tmp_path, monkeypatch):
    from conftest import COMMITTED_PARAMS

    from biovlm import workspace
    from biovlm.config import load_config

    params = tmp_path / "params.yaml"
    params.write_text(COMMITTED_PARAMS.read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DVC_EXP_NAME", "exp-7")
    monkeypatch.setattr(workspace, "dvc_pid", lambda: 31337)
    load_config(params)
    params.write_text(COMMITTED_PARAMS.read_text().replace("  epochs: 50\n", "  epochs: 5\n", 1))
    assert "  epochs: 5\n" in params.read_text()
    with pytest.raises(ConcurrentExperimentError, match="changed while `dvc exp run` exp-7"):
        load_config(params)
