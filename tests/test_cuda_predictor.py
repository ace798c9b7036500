"""The whole-slide network predictor on a GPU gives the CPU's maps (float32) and runs its autocast paths.

Skipped with the reason where no CUDA device is present.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scripts.model.network import CellVTA
from scripts.slides.predictors import NetworkPredictor

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU predictor cannot run here"),
]

NUM_CLASSES = 5


def network() -> CellVTA:
    torch.manual_seed(0)
    return CellVTA("vit-s", num_nuclei_classes=NUM_CLASSES, num_tissue_classes=3, vit_kwargs={"depth": 4})


@pytest.fixture
def tiles() -> np.ndarray:
    """``(3, 256, 256, 3)`` uint8 tiles."""
    return np.random.default_rng(0).integers(0, 256, (3, 256, 256, 3), dtype=np.uint8)


def test_gpu_predictor_in_float32_gives_the_cpu_maps_without_autocast(tiles, no_tf32):
    origins = np.zeros((len(tiles), 2), np.int64)
    cpu = NetworkPredictor(network(), "cpu", NUM_CLASSES, dtype=torch.float32)(tiles, origins)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float32 asked for: no autocast, hence no "dtype not supported" warning
        gpu = NetworkPredictor(network(), torch.device("cuda"), NUM_CLASSES, dtype=torch.float32)(tiles, origins)
    assert np.abs(gpu.nuclei_prob - cpu.nuclei_prob).max() < 1e-4
    assert np.abs(gpu.hv_map - cpu.hv_map).max() < 1e-4
    assert (gpu.type_map == cpu.type_map).mean() > 0.999
    assert np.abs(gpu.tissue - cpu.tissue).max() < 1e-4


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_gpu_predictor_under_autocast_stays_near_float32(tiles, half):
    origins = np.zeros((len(tiles), 2), np.int64)
    full = NetworkPredictor(network(), torch.device("cuda"), NUM_CLASSES, dtype=torch.float32)(tiles, origins)
    predictor = NetworkPredictor(network(), torch.device("cuda"), NUM_CLASSES, dtype=half)
    assert predictor.dtype == half
    low = predictor(tiles, origins)
    assert low.nuclei_prob.dtype == np.float32 and low.hv_map.dtype == np.float32
    assert np.abs(low.nuclei_prob - full.nuclei_prob).max() < 0.05
    assert np.abs(low.hv_map - full.hv_map).max() < 0.05
    assert (low.type_map == full.type_map).mean() > 0.95
