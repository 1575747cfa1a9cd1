"""Feature extraction: peak memory while streaming a TissueMNIST-shaped split, and image-tower throughput.

1. Peak resident memory. A synthetic twin of TissueMNIST at 224 px whose test split has the official test shape
   (47,280 x 224 x 224, grey: 2.4 GB of uint8) is generated once (a separate process, cached under ``--root``,
   default ``~/.cache/biovlm/bench``) and extracted to its memory-mappable ``.npy`` files. Then a fresh subprocess
   runs the feature stage's own code path, ``biovlm.features.extract_features`` with the ``tiny`` backbone (test
   split, validation shots and the few-shot pool under augmented views: batched memory-mapped reads, bicubic
   resize, normalisation, image tower), and its peak resident set size is read back: ``ru_maxrss`` of the child
   (kernel high-water mark, file-backed pages of the memory map included) and, polled every 50 ms from
   ``/proc/<pid>/status``, the peak of its anonymous memory (``RssAnon``: what it really allocated; mapped file
   pages are page cache the kernel can drop at any time).
2. Throughput of the ``biomedclip-random`` image tower (BiomedCLIP's ViT-B/16 at 224 px) over a bounded number of
   batches (all 47,280 images would take hours on a CPU), with and without preprocessing.

Run: ``python bench/features.py`` (first run generates the 2.4 GB twin: minutes). ``--n 2000`` for a quick run.
The last output line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import REPO, device_name, emit, machine, median, sync

DATASET = "tissuemnist"
SIZE = 224
TEST_N = 47_280  # TissueMNIST's official test split
TRAIN_N, VAL_N = 128, 32  # 16 training shots and 4 validation shots per class (8 classes)


def default_root() -> Path:
    return Path(os.environ.get("BIOVLM_CACHE") or Path.home() / ".cache" / "biovlm") / "bench"


def twin_root(root: Path, n: int) -> Path:
    return root / f"{DATASET}_{SIZE}_test{n}"


def prepare(root: Path, n: int) -> Path:
    """Generate (once) the synthetic twin and extract its .npy files; runs in its own process."""
    from biovlm import data

    folder = twin_root(root, n)
    path = data.npz_path(DATASET, SIZE, folder)
    if not path.exists():
        t0 = time.perf_counter()
        data.make_synthetic(DATASET, SIZE, {"train": TRAIN_N, "val": VAL_N, "test": n}, seed=0, root=folder)
        print(f"  generated {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    images, _ = data.load_split(DATASET, "test", SIZE, folder)  # extracts the .npy files on first use
    print(f"  test split {images.shape} {images.dtype} ready ({time.perf_counter() - t0:.0f} s)")
    return folder


def _status_kb(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0])
    except (OSError, ValueError):
        pass
    return out


def child(folder: Path, views: int, batch_size: int) -> None:
    """The measured part: the feature stage's code path on the whole split, tiny backbone."""
    import torch

    from biovlm import backbone as bb
    from biovlm import features as stage

    torch.set_grad_enabled(False)
    backbone = bb.load_backbone("tiny")
    base = _status_kb(os.getpid())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="biovlm-bench-") as tmp:
        out = stage.extract_features(DATASET, backbone, root=folder, size=SIZE, views=views, seeds=[1], max_shots=16,
                               batch_size=batch_size, out=Path(tmp) / f"{DATASET}.safetensors", seed=0)
        size_mb = out.stat().st_size / 1e6
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "baseline_rss_kb": base.get("VmRSS"), "file_mb": size_mb,
                      "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), flush=True)


def measure_memory(folder: Path, n: int, views: int, batch_size: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(folder), "--views", str(views),
           "--batch-size", str(batch_size)]
    env = {**os.environ, "TQDM_DISABLE": "1"}  # no progress bars in the figures' output
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            for key, value in _status_kb(proc.pid).items():
                if key in peak:
                    peak[key] = max(peak[key], value)
            time.sleep(0.05)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    lines = [line.rstrip() for line in proc.stdout]  # the child prints its progress; the last line is JSON
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    watcher.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for line in lines[:-1]:
        print("  | " + line)
    if proc.returncode != 0:
        raise RuntimeError(f"the measured feature run failed (exit {proc.returncode}); see its output above")
    result = json.loads(lines[-1])
    return {"images_streamed": n, "seconds": result["seconds"], "peak_rss_gb": usage.ru_maxrss / 2**20,
            "peak_anon_gb": peak["RssAnon"] / 2**20, "peak_file_mapped_gb": peak["RssFile"] / 2**20,
            "baseline_rss_gb": (result["baseline_rss_kb"] or 0) / 2**20, "feature_file_mb": result["file_mb"]}


def tower_throughput(name: str, batches: int, batch_size: int, device: str, raw_size: int = SIZE) -> dict:
    """Images per second of the image tower alone (prepared tensors) and with preprocessing (grey uint8 images of
    ``raw_size`` px in: to 3 channels, resize if needed, normalisation)."""
    import numpy as np

    from biovlm.backbone import load_backbone

    backbone = load_backbone(name, device=device)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (batch_size, raw_size, raw_size), dtype=np.uint8)
    x = backbone.prepare_images(raw)
    backbone.encode_images(x)  # warm-up
    sync(device)
    tower, full = [], []
    for _ in range(batches):
        t0 = time.perf_counter()
        backbone.encode_images(x)
        sync(device)
        tower.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        backbone.encode_images(backbone.prepare_images(raw))
        sync(device)
        full.append(time.perf_counter() - t0)
        print(f"  {name} batch of {batch_size}: tower {tower[-1]:.2f} s, with preprocessing {full[-1]:.2f} s",
              flush=True)
    return {"backbone": name, "device": str(backbone.device), "image_px": raw_size, "batch_size": batch_size,
            "batches": batches,
            "tower_images_per_s": batch_size / median(tower),
            "with_preprocessing_images_per_s": batch_size / median(full)}


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=TEST_N, help=f"test split size (default {TEST_N}, TissueMNIST's)")
    ap.add_argument("--root", type=Path, default=None, help="cache of the synthetic twin (~/.cache/biovlm/bench)")
    ap.add_argument("--views", type=int, default=2, help="augmented views per family of the pool")
    ap.add_argument("--batch-size", type=int, default=64, help="feature batch size (params.yaml features)")
    ap.add_argument("--tower", default="biomedclip-random", help="backbone whose image tower is timed ('' : skip)")
    ap.add_argument("--tower-batches", type=int, default=4)
    ap.add_argument("--tower-batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--target-gb", type=float, default=1.5)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prepare", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child is not None:
        child(args.child, args.views, args.batch_size)
        return None
    if args.prepare is not None:  # generation in its own process: its memory is not the feature stage's
        prepare(args.prepare, args.n)
        return None

    root = args.root or default_root()
    print(f"synthetic {DATASET} twin, test split {args.n} x {SIZE} x {SIZE} grey, under {root}")
    prep = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--prepare", str(root), "--n", str(args.n)],
                          cwd=REPO)
    if prep.returncode != 0:
        raise RuntimeError("generating the synthetic twin failed; see above")
    folder = twin_root(root, args.n)

    print("feature stage code path (biovlm.features.extract_features, tiny backbone) in a subprocess:")
    mem = measure_memory(folder, args.n, args.views, args.batch_size)
    met = mem["peak_rss_gb"] <= args.target_gb
    print(f"streamed {args.n} test images (+ val shots and pool x {args.views} views) in {mem['seconds']:.1f} s "
          f"({args.n / mem['seconds']:.0f} images/s); peak RSS {mem['peak_rss_gb']:.2f} GB (target <= "
          f"{args.target_gb:g} GB: {'met' if met else 'NOT met'}), of which polled peaks: anonymous "
          f"{mem['peak_anon_gb']:.2f} GB, mapped file pages {mem['peak_file_mapped_gb']:.2f} GB; "
          f"{mem['baseline_rss_gb']:.2f} GB after imports and backbone load")
    figures = {"bench": "features", "dataset_shape": [args.n, SIZE, SIZE], **{k: round(v, 3) if isinstance(v, float)
               else v for k, v in mem.items()}, "target_gb": args.target_gb, "memory_met": met}
    if args.tower:
        device = device_name(args.device)
        print(f"image tower throughput ({args.tower}, {device}):")
        tp = tower_throughput(args.tower, args.tower_batches, args.tower_batch_size, device)
        print(f"{args.tower}: {tp['tower_images_per_s']:.2f} images/s (tower), "
              f"{tp['with_preprocessing_images_per_s']:.2f} images/s with preprocessing; the whole 47,280-image "
              f"split would take {TEST_N / tp['tower_images_per_s'] / 3600:.1f} h")
        figures["tower"] = {k: round(v, 3) if isinstance(v, float) else v for k, v in tp.items()}
    figures["machine"] = machine()
    emit(figures)
    return figures


if __name__ == "__main__":
    main()
