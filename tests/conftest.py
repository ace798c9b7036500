"""Shared test fixtures: the real data beside the repository (``../shared/data``), exact float32 on a GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the ../shared/data folder is absent on this machine)")
    return path


@pytest.fixture(scope="session")
def consep_npz() -> Path:
    """Path of the real CoNSeP training patches (432 tiles of 256x256)."""
    return _require(SHARED_DATA / "consep" / "consep_train.npz")


@pytest.fixture(scope="session")
def consep(consep_npz: Path) -> dict[str, np.ndarray]:
    """The CoNSeP patches as arrays: images (N,256,256,3) uint8, inst_map (N,256,256) int32, type_map, tile."""
    with np.load(consep_npz) as d:
        return {k: d[k] for k in ("images", "inst_map", "type_map", "tile", "source_name")}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """Folder with the post-processing and metric reference fixtures."""
    return _require(SHARED_DATA / "fixtures")


@pytest.fixture
def no_tf32():
    """Exact float32 convolutions and matmuls on a GPU (no TF32), so that GPU results compare with exact ones."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
