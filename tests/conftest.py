"""Shared fixtures: the official BreastMNIST files beside the checkout, synthetic twins, the tiny backbone."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_MEDMNIST = ROOT.parent / "shared" / "data" / "medmnist"


def committed_file(rel: str) -> str:
    """A file as committed (git's HEAD), not as the workspace holds it: `dvc exp run` leaves an experiment's
    params.yaml (`profile: demo`, changed knobs) behind, and the tests must not depend on that. Outside a git
    checkout (an unpacked sdist) the file itself."""
    try:
        return subprocess.run(["git", "show", f"HEAD:{rel}"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return (ROOT / rel).read_text()


def pytest_report_header(config) -> str | None:
    if committed_file("params.yaml") != (ROOT / "params.yaml").read_text():
        return ("note: the tests read the committed params.yaml; the workspace's differs (an applied experiment, or "
                "an uncommitted edit: commit it to test it)")
    return None


def _committed_copy() -> Path:
    """The committed params.yaml and conf/ copied into a temporary folder, once per process tree. pytest re-imports
    this module for every session, and mutmut runs a session in each forked child, which ends with ``os._exit``
    (atexit never runs): a folder per import left one behind per mutant. Children find their parent's folder through
    the environment; the process that made it removes it at exit."""
    known = Path(os.environ.get(_COMMITTED_ENV, "") or "/nonexistent")
    if (known / "params.yaml").is_file():
        return known / "params.yaml"
    folder = Path(tempfile.mkdtemp(prefix="biovlm-committed-"))
    (folder / "params.yaml").write_text(committed_file("params.yaml"))
    profiles = sorted((ROOT / "conf" / "profile").glob("*.yaml"))
    for rel in ["conf/config.yaml", *(f"conf/profile/{p.name}" for p in profiles)]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)  # what load_config composes from
        (folder / rel).write_text(committed_file(rel))
    os.environ[_COMMITTED_ENV] = str(folder)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder / "params.yaml"


_COMMITTED_ENV = "BIOVLM_TEST_COMMITTED_DIR"
COMMITTED_PARAMS = _committed_copy()
"""A copy of the committed params.yaml (conf/ beside it) for every test that reads the configuration."""


def demo_transform():
    """The demo profile's view transform (its features: the backbone's own normalisation)."""
    from biovlm.config import load_config
    from biovlm.features import ViewTransform

    return ViewTransform.from_config(load_config(COMMITTED_PARAMS, {"profile": "demo"})["features"])


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run many small ops, which a second thread only slows down (10x+ when the other core is busy)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime: what must not change when a folder is read in place."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}


@pytest.fixture
def official_breastmnist(tmp_path: Path) -> Path:
    """A writable folder holding copies of the official BreastMNIST files (28 and 64 px); skips without them."""
    if not (SHARED_MEDMNIST / "breastmnist.npz").exists():
        pytest.skip(f"official BreastMNIST files not found in {SHARED_MEDMNIST}")
    root = tmp_path / "official"
    root.mkdir()
    for name in ("breastmnist.npz", "breastmnist_64.npz"):
        shutil.copyfile(SHARED_MEDMNIST / name, root / name)
    return root


@pytest.fixture
def disk(monkeypatch) -> SimpleNamespace:
    """A disk whose free space the test sets (``disk.free``, in bytes) as ``shutil.disk_usage`` reports it: a full
    disk without root rights or a real one."""
    state = SimpleNamespace(free=10**12)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2 * 10**12, used=10**12,
                                                                            free=state.free))
    return state


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic twins of three datasets (grey 2-class, RGB 8-class, grey 11-class) at 28 px."""
    from biovlm.data import make_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    for name in ("breastmnist", "bloodmnist", "organamnist"):
        make_synthetic(name, 28, {"train": 264, "val": 44, "test": 88}, seed=0, root=root)
    return root


@pytest.fixture(scope="session")
def tiny_backbone():
    """The small two-tower test model (random weights, built offline in seconds)."""
    from biovlm.backbone import load_backbone

    return load_backbone("tiny")
