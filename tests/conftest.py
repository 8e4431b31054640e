"""Shared fixtures: real data is read from $DFA_DATA_DIR (CI: ../shared/data) and copied to tmp before use."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)  # CI has 2 cores; small models run faster single-threaded and tests stay stable

SHARED_DATA = Path(os.environ.get("DFA_DATA_DIR", REPO.parent / "shared" / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real datasets not found at {SHARED_DATA} (set DFA_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture
def cora_root(shared_data: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the Planetoid Cora files (PyG writes processed/ next to raw/)."""
    src = shared_data / "planetoid" / "Cora"
    if not src.is_dir():
        pytest.skip(f"Cora not found at {src}")
    dst = tmp_path / "data" / "planetoid" / "Cora"
    shutil.copytree(src / "raw", dst / "raw")
    return tmp_path / "data"
