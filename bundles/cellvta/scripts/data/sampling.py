"""Oversampling of rare classes and tissues (reference section 6.2, CellViT's ``cell+tissue`` strategy)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import WeightedRandomSampler


def tissue_weights(tissues: np.ndarray, gamma: float = 0.85, tissue_counts: Sequence[int] | None = None) -> np.ndarray:
    """Per-image tissue weight w_t = K / (gamma n_t + (1 - gamma) K).

    Args:
        tissues: (N,) tissue id of each image.
        gamma: 0 gives uniform weights, 1 inverse-frequency weights.
        tissue_counts: n_t per tissue id (e.g. counted over all folds, as the official code); default
            counted from ``tissues``.

    Returns:
        (N,) float64.
    """
    tissues = np.asarray(tissues, dtype=np.int64)
    counts = np.bincount(tissues) if tissue_counts is None else np.asarray(tissue_counts, dtype=np.float64)
    if tissues.size and tissues.max() >= counts.size:
        raise ValueError(f"tissue id {tissues.max()} has no count (tissue_counts has {counts.size} entries)")
    total = counts.sum()
    return total / (gamma * counts[tissues] + (1 - gamma) * total)


def cell_weights(
    cell_counts: np.ndarray, gamma: float = 0.85, class_factors: Sequence[int] | None = None
) -> np.ndarray:
    """Per-image cell weight (1 - gamma) max_c b_c + gamma sum_c b_c v_c with v_c = k / (gamma f_c + (1 - gamma) k).

    Args:
        cell_counts: (N, C) nuclei per foreground class of each image (background column excluded).
        gamma: 0 gives uniform weights, 1 inverse-frequency weights.
        class_factors: f_c, number of images containing class c; default counted from ``cell_counts``.

    Returns:
        (N,) float64; images without nuclei get the smallest non-zero weight.
    """
    presence = (np.asarray(cell_counts) > 0).astype(np.float64)
    factors = presence.sum(0) if class_factors is None else np.asarray(class_factors, dtype=np.float64)
    if factors.size != presence.shape[1]:
        raise ValueError(f"class_factors has {factors.size} entries for {presence.shape[1]} classes")
    total = factors.sum()
    v = total / (gamma * factors + (1 - gamma) * total)
    weights = (1 - gamma) * presence.max(1, initial=0.0) + gamma * presence @ v
    positive = weights > 0
    if positive.any():
        weights[~positive] = weights[positive].min()
    else:
        weights[:] = 1.0
    return weights


def sampling_weights(
    cell_counts: np.ndarray,
    tissues: np.ndarray | None = None,
    gamma: float = 0.85,
    class_factors: Sequence[int] | None = None,
    tissue_counts: Sequence[int] | None = None,
) -> np.ndarray:
    """``cell+tissue`` weights w_tissue / max + w_cell / max; cell weights alone when ``tissues`` is None.

    Args:
        cell_counts: (N, C) nuclei per foreground class of each image.
        tissues: (N,) tissue ids, or None.

    Returns:
        (N,) float64.
    """
    cell = cell_weights(cell_counts, gamma, class_factors)
    weights = cell / cell.max()
    if tissues is not None:
        tissue = tissue_weights(tissues, gamma, tissue_counts)
        weights = weights + tissue / tissue.max()
    return weights


class CellTissueSampler(WeightedRandomSampler):
    """Weighted sampling with replacement of a :func:`scripts.data.datasets.dataset_list` by cell and tissue rarity.

    Args:
        data: list of dicts with ``cell_counts`` (per class id, index 0 background) and ``tissue``.
        gamma: strength of the oversampling (0.85 in CellVTA).
        use_tissue: include tissue weights; they are left out automatically when all images share one tissue.
        num_samples: draws per epoch (default ``len(data)``).
        seed: seed of the sampler's generator.
        class_factors, tissue_counts: the counts of :func:`sampling_weights`, default counted from ``data``.
    """

    def __init__(
        self,
        data: Sequence[dict],
        gamma: float = 0.85,
        use_tissue: bool = True,
        num_samples: int | None = None,
        seed: int | None = None,
        class_factors: Sequence[int] | None = None,
        tissue_counts: Sequence[int] | None = None,
    ) -> None:
        if not data:
            raise ValueError("CellTissueSampler: empty data list")
        missing = [d.get("name", i) for i, d in enumerate(data) if not d.get("cell_counts")]
        if missing:
            raise ValueError(f"CellTissueSampler: samples without 'cell_counts', e.g. {missing[:3]}")
        counts = np.asarray([d["cell_counts"] for d in data])[:, 1:]
        tissues = np.asarray([d.get("tissue", 0) for d in data])
        with_tissue = use_tissue and np.unique(tissues).size > 1
        self.sample_weights = sampling_weights(
            counts, tissues if with_tissue else None, gamma, class_factors, tissue_counts
        )
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        super().__init__(
            torch.as_tensor(self.sample_weights, dtype=torch.double),
            num_samples or len(data),
            replacement=True,
            generator=generator,
        )
