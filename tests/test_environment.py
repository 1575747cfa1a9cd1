"""The environment record written beside results: versions, machine, commit, device and the weights' hash."""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
import torch

from biovlm import environment
from biovlm.runs import InputError, check_weights


def test_record_names_versions_commit_device_and_weights(tiny_backbone):
    record = environment.describe("cpu", tiny_backbone)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert record["git_commit"].removesuffix("-dirty") == head
    assert record["packages"]["torch"] == torch.__version__.split("+")[0]
    assert set(record["packages"]) == set(environment.PACKAGES)
    assert record["device"] == f"cpu ({environment.processor()})"
    assert record["backbone"] == {"name": "tiny", "weights_sha256": tiny_backbone.fingerprint}
    line = environment.summary_line(record)
    assert f"torch {record['packages']['torch']}" in line and f"kornia {record['packages']['kornia']}" in line
    assert f"commit {head[:12]}" in line and f"weights sha256 {tiny_backbone.fingerprint[:12]}" in line


def test_git_commit_outside_a_repository_is_unknown(tmp_path):
    assert environment.git_commit(tmp_path) == "unknown"


def test_features_made_by_other_weights_are_refused(tiny_backbone):
    ok = SimpleNamespace(features=SimpleNamespace(meta={"weights_sha256": tiny_backbone.fingerprint}))
    check_weights(tiny_backbone.fingerprint, "tiny", {"bloodmnist": ok})
    other = SimpleNamespace(features=SimpleNamespace(meta={"weights_sha256": "ab" * 32}))
    with pytest.raises(InputError, match=rf"features of breastmnist were made by weights with sha256 {'ab' * 32}, "
                                         rf"but the loaded tiny has {tiny_backbone.fingerprint}: rerun the features"):
        check_weights(tiny_backbone.fingerprint, "tiny", {"bloodmnist": ok, "breastmnist": other})
