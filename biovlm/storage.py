"""Large writes that survive a full disk: space checked (or reserved) first, a temporary file renamed only when
complete, and one clear error instead of a crash.

Every large file the pipeline writes (extracted ``.npy`` splits, feature files, run checkpoints) goes through
``atomic_write``. A full disk is found before writing when possible (``shutil.disk_usage``, and
``posix_fallocate`` where the exact size is known) and otherwise from the error the writer raises mid-write
(``OSError`` ENOSPC, safetensors' ``SafetensorError``, torch's ``unexpected pos`` ``RuntimeError``). Either way the
caller gets a ``DiskFullError`` whose message names the bytes needed, the bytes free, the folder and the fix;
the temporary file is gone and the file being replaced is untouched.

Temporary files are named ``.<name>.<pid>.tmp`` beside their target, so a later run can tell the leftovers of a
killed process (``remove_stale_temporaries``) from the file a running process is writing.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How writers that do not raise OSError report a full disk: safetensors (Rust io::Error text) and torch's zip
# writer, which only notices that a write came up short ("[enforce fail at inline_container.cc:...] unexpected pos").
_FULL_TEXTS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122", "unexpected pos")
_TEMPORARY = re.compile(r"\..+\.(\d+)\.tmp")
# What a pickled or safetensors file holds besides its arrays: its header, metadata and small Python values.
MARGIN_BYTES = 1 << 20
MARGIN_PER_ARRAY = 1 << 10


class DiskFullError(OSError, RuntimeError):
    """Not enough disk space for a write. A RuntimeError too, so every stage reports it as ``<stage>: error:``."""

    def __init__(self, folder: str | Path, needed: int, free: int, what: str) -> None:
        self.folder, self.needed, self.free = Path(folder), int(needed), int(free)
        super().__init__(f"not enough disk space in {self.folder}: {what} needs {amount(self.needed)}, only "
                         f"{amount(self.free)} free; free space there or point that folder to a larger disk")
        self.errno = errno.ENOSPC


def amount(nbytes: int) -> str:
    """``1,234,567 bytes (1.2 MB)``: exact, and readable at a glance."""
    exact = f"{nbytes:,} bytes"
    short = readable(nbytes)
    return exact if short == exact else f"{exact} ({short})"


def readable(nbytes: int) -> str:
    """``1.2 MB``: in the largest decimal unit that keeps the number at least 1 (``999 bytes`` below 1 kB)."""
    for power, unit in ((4, "TB"), (3, "GB"), (2, "MB"), (1, "kB")):
        if nbytes >= 1000**power:
            return f"{nbytes / 1000**power:.1f} {unit}"
    return f"{nbytes:,} bytes"


def free_bytes(folder: str | Path) -> int:
    """Bytes an unprivileged process may still write in ``folder`` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return int(shutil.disk_usage(folder).free)


def check_free(folder: str | Path, needed: int, what: str) -> None:
    """Raise ``DiskFullError`` when ``folder`` has fewer than ``needed`` bytes free."""
    free = free_bytes(folder)
    if free < needed:
        raise DiskFullError(folder, needed, free, what)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) says that the disk or the quota is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _FULL_ERRNOS:
            return True
        if any(text in str(error).lower() for text in _FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


def reserve(path: Path, nbytes: int, what: str) -> None:
    """Create ``path`` with ``nbytes`` of disk space allocated (``posix_fallocate``), so that filling it cannot run
    out of space: a write through a memory map that does is killed by SIGBUS, with no message. A filesystem that
    cannot allocate ahead (some network and copy-on-write ones) gets only the free-space check of the caller."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, nbytes)
    except OSError as error:
        if error.errno in _FULL_ERRNOS:
            os.close(fd)
            fd = None
            path.unlink(missing_ok=True)  # a failed allocation may keep the blocks it got
            raise DiskFullError(path.parent, nbytes, free_bytes(path.parent), what) from None
        if error.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        if fd is not None:
            os.close(fd)


def temporary_path(path: Path) -> Path:
    """The hidden temporary file of ``path`` for this process: ``.<name>.<pid>.tmp`` in the same folder."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], None], nbytes: int, what: str,
                 preallocate: bool = False) -> None:
    """Write ``path`` by ``write(tmp)`` into a temporary file, renamed over ``path`` only once complete.

    ``nbytes`` is the file's size (exact with ``preallocate``, else an estimate, see ``estimated_bytes``);
    fewer free bytes in the folder fail before anything is written. With ``preallocate`` the temporary file already
    holds ``nbytes`` of reserved space when ``write`` gets it (open it with ``"r+b"``: ``"wb"`` would drop the
    reservation). A full disk found mid-write becomes a ``DiskFullError`` as well. Whatever fails, the
    temporary file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    check_free(folder, nbytes, what)
    tmp = temporary_path(path)
    try:
        if preallocate:
            reserve(tmp, nbytes, what)
        write(tmp)
        os.replace(tmp, path)
    except Exception as error:
        if isinstance(error, DiskFullError) or not is_disk_full(error):
            raise
        tmp.unlink(missing_ok=True)  # before measuring: the partial file's blocks are free again
        raise DiskFullError(folder, nbytes, free_bytes(folder), what) from error
    finally:
        tmp.unlink(missing_ok=True)


def estimated_bytes(obj) -> int:
    """A generous size of ``obj`` saved by ``torch.save`` or safetensors: the bytes of every array in it (a torch
    tensor counts its whole storage, which is what ``torch.save`` writes) plus a margin for headers and the
    pickled rest. Walks dicts, lists and tuples."""
    arrays, total = 0, 0
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif hasattr(item, "untyped_storage"):
            arrays, total = arrays + 1, total + item.untyped_storage().nbytes()
        elif hasattr(item, "nbytes") and not isinstance(item, (bytes, str)):
            arrays, total = arrays + 1, total + int(item.nbytes)
    return total + MARGIN_BYTES + MARGIN_PER_ARRAY * arrays


def process_running(pid: int) -> bool:
    """Whether process ``pid`` exists (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temporaries(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Delete the temporary files in ``folder`` (and its subfolders) whose process no longer runs (left by a killed
    run: DVC would count them as a change of the output folder); returns them. A running process's file stays."""
    removed = []
    found = Path(folder).rglob(".*.tmp") if recursive else Path(folder).glob(".*.tmp")
    for path in sorted(found):  # nothing when the folder does not exist
        match = _TEMPORARY.fullmatch(path.name)
        if match and path.is_file() and not process_running(int(match.group(1))):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
