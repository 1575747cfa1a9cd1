"""biovlm/storage.py: large writes on a full disk give one clear error, leave no temporary file and keep the file
they would have replaced. A full disk is simulated without root rights: ``shutil.disk_usage`` (the ``disk``
fixture), ``os.posix_fallocate`` and the writers are replaced by ones that fail as the real ones do."""

from __future__ import annotations

import errno
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from biovlm import storage
from biovlm.config import stage_main

FIX = "free space there or point that folder to a larger disk"
# What the writers raise when the disk fills mid-write (seen on a 2 MB tmpfs): safetensors' save_file, torch.save
# (its zip writer only notices a short write), and plain Python writes.
WILD_ERRORS = {
    "safetensors": lambda: __import__("safetensors").SafetensorError(
        "Error while serializing: I/O error: No space left on device (os error 28)"),
    "torch.save": lambda: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),
    "OSError": lambda: OSError(errno.ENOSPC, "No space left on device"),
    "quota": lambda: OSError(errno.EDQUOT, "Disk quota exceeded"),
}


def test_the_error_names_bytes_needed_and_free_the_folder_and_the_fix(tmp_path, capsys):
    error = storage.DiskFullError(tmp_path, 12_345_678, 999, "writing x.pt")
    assert str(error) == (f"not enough disk space in {tmp_path}: writing x.pt needs 12,345,678 bytes (12.3 MB), "
                          f"only 999 bytes free; {FIX}")
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC

    def main(argv):
        raise error

    with pytest.raises(SystemExit) as exc:  # a RuntimeError: every stage reports it in one line
        stage_main("train", main, [])
    assert exc.value.code == 1
    assert capsys.readouterr().err == f"train: error: {error}\n"


def test_amounts_are_exact_and_readable():
    assert storage.amount(0) == "0 bytes"
    assert storage.amount(999) == "999 bytes"
    assert storage.amount(1000) == "1,000 bytes (1.0 kB)"
    assert storage.amount(8_300_000_000) == "8,300,000,000 bytes (8.3 GB)"
    assert storage.amount(2 * 10**12) == "2,000,000,000,000 bytes (2.0 TB)"


def test_too_little_free_space_fails_before_anything_is_written(tmp_path, disk):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")
    disk.free = 99
    calls = []
    message = f"not enough disk space in {tmp_path}: writing out.bin needs 100 bytes, only 99 bytes free; {FIX}"
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$"):
        storage.atomic_write(target, calls.append, 100, "writing out.bin")
    assert calls == [] and target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]
    disk.free = 100
    storage.atomic_write(target, lambda tmp: tmp.write_bytes(b"x" * 100), 100, "writing out.bin")
    assert target.read_bytes() == b"x" * 100 and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("kind", list(WILD_ERRORS))
def test_a_disk_filling_up_mid_write_is_the_same_error(tmp_path, disk, kind):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"x" * 64)  # the disk fills meanwhile (another process)
        disk.free = 10
        raise WILD_ERRORS[kind]()

    message = (f"not enough disk space in {tmp_path}: writing out.bin needs 5,000 bytes (5.0 kB), only 10 bytes "
               f"free; {FIX}")
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$") as raised:
        storage.atomic_write(target, write, 5000, "writing out.bin")
    assert type(raised.value.__cause__).__name__ == type(WILD_ERRORS[kind]()).__name__  # kept for BIOVLM_DEBUG
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("error", [ValueError("bad value"), OSError(errno.EACCES, "Permission denied"),
                                   RuntimeError("CUDA error"), KeyboardInterrupt()])
def test_other_failures_pass_through_and_leave_no_temporary_file(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)) as raised:
        storage.atomic_write(target, write, 10, "writing out.bin")
    assert raised.value is error
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.bin"]


def test_preallocation_reserves_the_space_or_names_the_shortage(tmp_path, disk, monkeypatch):
    sizes = []

    def write(tmp: Path) -> None:
        sizes.append(tmp.stat().st_size)
        with open(tmp, "r+b") as f:
            f.write(b"y" * 4096)

    storage.atomic_write(tmp_path / "a.npy", write, 4096, "extracting a", preallocate=True)
    assert sizes == [4096] and (tmp_path / "a.npy").read_bytes() == b"y" * 4096

    def full(fd, offset, length):
        os.ftruncate(fd, length // 2)  # a failed allocation may keep what it got
        disk.free = 7
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    message = (f"not enough disk space in {tmp_path}: extracting b needs 4,096 bytes (4.1 kB), only 7 bytes free; "
               f"{FIX}")
    with pytest.raises(storage.DiskFullError, match=f"^{re.escape(message)}$"):
        storage.atomic_write(tmp_path / "b.npy", write, 4096, "extracting b", preallocate=True)
    assert sorted(os.listdir(tmp_path)) == ["a.npy"] and len(sizes) == 1

    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    disk.free = 10**9
    monkeypatch.setattr(os, "posix_fallocate", unsupported)  # some network filesystems: the free-space check only
    storage.atomic_write(tmp_path / "c.npy", write, 4096, "extracting c", preallocate=True)
    assert (tmp_path / "c.npy").read_bytes() == b"y" * 4096


def test_only_the_temporary_files_of_finished_processes_are_removed(tmp_path):
    dead = _finished_pid()
    sub = tmp_path / "fewshot" / "breastmnist"
    sub.mkdir(parents=True)
    left = [tmp_path / f".a.pt.{dead}.tmp", sub / f".k1_seed1.pt.{dead}.tmp"]
    kept = [sub / f".k2_seed1.pt.{os.getppid()}.tmp", sub / f".k4_seed1.pt.{os.getpid()}.tmp",
            sub / "k1_seed1.pt", sub / "notes.tmp", sub / f".x.{dead}.tmp.npy"]
    for path in left + kept:
        path.write_bytes(b"")
    assert storage.remove_stale_temporaries(tmp_path / "nothing") == []
    assert storage.remove_stale_temporaries(tmp_path, recursive=False) == [left[0]]
    assert storage.remove_stale_temporaries(tmp_path) == [left[1]]
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(kept)


def _finished_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_estimated_bytes_count_whole_storages_and_a_margin():
    big = torch.zeros(1000)
    margin = storage.MARGIN_BYTES
    assert storage.estimated_bytes({}) == margin
    assert storage.estimated_bytes({"a": big[:10], "rows": [{"x": 1.0, "t": torch.ones(3, dtype=torch.float16)}],
                                    "n": np.zeros(5)}) == (
        4000 + 6 + 40 + margin + 3 * storage.MARGIN_PER_ARRAY)
