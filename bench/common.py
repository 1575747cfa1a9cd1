"""Small helpers shared by the benchmark scripts: the machine they ran on, timing, the final JSON line."""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `python bench/x.py` from anywhere imports this checkout's biovlm
    sys.path.insert(0, str(REPO))


def machine() -> dict:
    """Where the figures come from: CPU, cores, torch threads, GPU (if any), and the load average at this moment
    (a load above the core count means other processes shared the CPU while the figures were taken)."""
    import torch

    from biovlm import environment

    info = {"cpu": environment.processor(), "cores": os.cpu_count(), "python": platform.python_version(),
            "packages": environment.package_versions(), "torch_threads": torch.get_num_threads(),
            "loadavg_1min": round(os.getloadavg()[0], 2)}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def device_name(requested: str = "auto") -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1, device: str = "cpu",
          label: str = "") -> tuple[list[float], list[object]]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times timed; returns (seconds, results)."""
    results = []
    for i in range(warmup):
        t0 = time.perf_counter()
        results.append(fn())
        sync(device)
        if label:
            print(f"  {label} warm-up {i + 1}/{warmup}: {time.perf_counter() - t0:.2f} s", flush=True)
    seconds = []
    for i in range(repeats):
        t0 = time.perf_counter()
        results.append(fn())
        sync(device)
        seconds.append(time.perf_counter() - t0)
        if label:
            print(f"  {label} timed {i + 1}/{repeats}: {seconds[-1]:.2f} s", flush=True)
    return seconds, results


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def copy_checkout(dest: Path) -> int:
    """Copy the files git would commit (tracked + untracked, not ignored) into ``dest``; returns the count."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                         capture_output=True, check=True).stdout
    files = [f for f in out.decode().split("\0") if f]
    n = 0
    for rel in files:
        src = REPO / rel
        if not src.is_file():  # deleted in the working tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        n += 1
    return n


def replace_block(path: Path, name: str, text: str) -> bool:
    """Put ``text`` between the markers ``<!-- {name}:start ... -->`` and ``<!-- {name}:end -->`` of ``path`` (a
    README or docs page that shows produced figures inline); False, and nothing written, when the markers are absent."""
    page = path.read_text()
    start, end = f"<!-- {name}:start", f"<!-- {name}:end -->"
    if start not in page or end not in page:
        return False
    before, rest = page.split(start, 1)
    marker, rest = rest.split("-->", 1)
    after = rest.split(end, 1)[1]
    path.write_text(f"{before}{start}{marker}-->\n{text.strip()}\n{end}{after}")
    return True


def emit(figures: dict) -> None:
    """The last output line of every benchmark script: one JSON object with its figures."""
    print(json.dumps(figures, sort_keys=False), flush=True)
