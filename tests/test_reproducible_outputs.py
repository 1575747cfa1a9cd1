"""Every DVC output is the same bytes in every process for the same inputs, so a rerun changes no hash and DVC reruns
no stage it need not (feature files once differed per process and made every change rerun everything)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
from pathlib import Path
from test_stages import write_params
root = Path(sys.argv[1])
root.mkdir(parents=True)
write_params(root / "params.yaml", methods=["zeroshot", "coop", "biovlm", "linear_probe"])
os.chdir(root)
os.environ["BIOVLM_RUN_STORE"] = str(root.parent / (root.name + "-store"))
from stages import attributes, crossdata, download, evaluate, features, report, train
from stages import filter as filter_stage
for ds in ("breastmnist", "bloodmnist"):
    download.main([ds])
attributes.main([]); features.main([]); filter_stage.main([]); train.main(["--no-live"])
crossdata.main([]); evaluate.main([]); report.main([])
"""


@pytest.mark.slow
def test_every_output_is_the_same_bytes_in_two_processes(tmp_path):
    code = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"))
    for name in ("a", "b"):
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / name)], capture_output=True, text=True,
                              cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
    outputs = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*")
                     if p.is_file() and ".extracted" not in p.parts)  # .extracted: a cache DVC ignores
    kinds = {p.parts[0] for p in outputs}
    assert {"data", "features", "checkpoints", "results", "metrics", "report"} <= kinds
    assert any(p.suffix == ".safetensors" for p in outputs) and any(p.suffix == ".png" for p in outputs)
    differ = [str(p) for p in outputs if (tmp_path / "a" / p).read_bytes() != (tmp_path / "b" / p).read_bytes()]
    assert differ == []
    assert sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*")
                  if p.is_file() and ".extracted" not in p.parts) == outputs
