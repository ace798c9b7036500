"""The built-in synthetic demo dataset, made when a workflow runs without a dataset."""

from __future__ import annotations

import logging
from pathlib import Path

from ..data.datasets import DATASET_JSON
from ..data.prepare import synthetic

logger = logging.getLogger(__name__)


def demo_dataset(path: str, n: int = 48, size: int = 256, seed: int = 0) -> str:
    """The folder of the synthetic demo dataset, written first if it holds no ``dataset.json``.

    This is the default of the configs' ``dataset_dir``: a workflow given no dataset trains and evaluates
    on SYNTHETIC H&E-like tiles (``scripts.data.prepare synthetic``, not real tissue), and says so.

    Args:
        path: the demo dataset's folder.
        n: number of tiles.
        size: tile side in pixels.
        seed: random seed of the tiles.

    Returns:
        ``path``.
    """
    if not (Path(path) / DATASET_JSON).is_file():
        logger.warning(
            "no dataset given: writing %d SYNTHETIC H&E-like demo tiles (not real tissue) to %s. "
            "Train on real data with --dataset_dir <folder written by scripts.data.prepare> --dataset_name "
            "<pannuke|conic|consep|monuseg|folder>.", n, path,
        )
        synthetic(path, n=n, size=size, seed=seed)
    else:
        logger.info("no dataset given: using the synthetic demo dataset in %s", path)
    return path
