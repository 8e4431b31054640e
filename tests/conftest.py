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


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(autouse=True, scope="session")
def _shared_data_left_as_it_was():
    """Tests read the shared datasets and write only into copies: checked once over the whole session."""
    before = _tree(SHARED_DATA) if SHARED_DATA.is_dir() else None
    yield
    if before is not None:
        after = _tree(SHARED_DATA)
        changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
        assert not changed, f"the test session wrote into {SHARED_DATA}: {changed[:5]}"


#: what a run leaves in its working directory when nothing tells it where to write (the repository root, here)
RUN_LEFTOVERS = ("config.yaml", "lightning_logs", "checkpoints")


@pytest.fixture(autouse=True)
def _nothing_written_into_the_repository():
    """A CLI run with no logger and no ``default_root_dir`` saves its resolved config in the CWD: each test's runs
    go to its own tmp_path, so the one that writes here is named."""
    before = {name for name in RUN_LEFTOVERS if (REPO / name).exists()}
    yield
    left = {name for name in RUN_LEFTOVERS if (REPO / name).exists()} - before
    assert not left, f"this test wrote {sorted(left)} into the repository root: give its runs a tmp_path folder"


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
