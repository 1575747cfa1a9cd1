"""What produced a number: package versions, machine, device, git commit. Recorded beside every result."""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "torchvision", "open_clip_torch", "timm", "transformers", "kornia", "numpy", "scikit-learn",
            "safetensors", "medmnist", "dvc")
"""The packages whose versions shape the benchmark's numbers (pinned in requirements/constraints.txt)."""


def package_versions() -> dict[str, str]:
    """Installed version of each of ``PACKAGES`` (``"not installed"`` where absent)."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def processor() -> str:
    """The CPU model as the OS names it (``/proc/cpuinfo`` on Linux), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str | int]:
    import os

    return {"python": platform.python_version(), "platform": platform.platform(), "processor": processor(),
            "cores": os.cpu_count() or 0}


def git_commit(root: str | Path = ".") -> str:
    """``HEAD``'s commit, with ``-dirty`` when tracked files differ from it; ``"unknown"`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def device_name(device: str) -> str:
    """``"cpu (<processor>)"`` or ``"cuda:0 (<GPU name>, CUDA <version>)"``."""
    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)}, CUDA {torch.version.cuda})"
    return f"{dev} ({processor()})"


def describe(device: str | None = None, backbone=None, root: str | Path = ".") -> dict:
    """The environment record written beside results: versions, machine, commit, device, backbone weights."""
    record: dict = {"packages": package_versions(), "machine": machine(), "git_commit": git_commit(root)}
    if device is not None:
        record["device"] = device_name(device)
    if backbone is not None:
        record["backbone"] = {"name": backbone.name, "weights_sha256": backbone.fingerprint}
    return record


def summary_line(record: dict) -> str:
    """One readable line of an environment record, e.g. for a report header."""
    p, m = record["packages"], record["machine"]
    parts = [f"Python {m['python']}", f"torch {p['torch']}", f"open_clip {p['open_clip_torch']}",
             f"kornia {p['kornia']}", f"numpy {p['numpy']}", record.get("device", m["processor"]),
             f"commit {record['git_commit'][:12]}"]
    if "backbone" in record:
        parts.append(f"weights sha256 {record['backbone']['weights_sha256'][:12]}")
    return ", ".join(parts)
