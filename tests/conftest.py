"""Shared fixtures: the official BreastMNIST files beside the checkout, synthetic twins, the tiny backbone."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SHARED_MEDMNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "medmnist"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run many small ops, which a second thread only slows down (10x+ when the other core is busy)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
