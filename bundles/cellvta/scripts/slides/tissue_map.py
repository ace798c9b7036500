"""A slide's tissue predictions: the network's tissue head per tile -> a tissue-class map and class fractions.

The map has one pixel per tile of the slide's grid (pixel ``(row, col)`` is tile ``(row, col)``), coloured by the
tile's predicted class (the argmax of the tissue head's softmax) in :data:`TISSUE_PALETTE` (class ``k`` takes
colour ``k``, cycling after the last); tiles that were not analysed are white.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["TISSUE_PALETTE", "UNANALYSED", "tissue_colour", "tissue_map", "tissue_name", "tissue_summary"]

# matplotlib's tab20 order (pairs of one hue), white left out
TISSUE_PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
                  (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (174, 199, 232), (255, 187, 120),
                  (152, 223, 138), (255, 152, 150), (197, 176, 213), (196, 156, 148), (247, 182, 210), (199, 199, 199),
                  (219, 219, 141), (158, 218, 229)]
UNANALYSED = (255, 255, 255)


def tissue_colour(index: int) -> tuple[int, int, int]:
    """RGB colour of tissue class ``index``."""
    return TISSUE_PALETTE[index % len(TISSUE_PALETTE)]


def tissue_name(names: Sequence[str], index: int) -> str:
    """Name of tissue class ``index`` (``tissue_<index>`` beyond the table)."""
    return names[index] if index < len(names) else f"tissue_{index}"


def tissue_map(tiles: np.ndarray, probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(rows, cols, 3)`` uint8 RGB map of the grid of ``shape``.

    Args:
        tiles: (M, 2) int ``(row, col)`` of the analysed tiles.
        probabilities: (M, K) tissue softmax of each.
        shape: ``(rows, cols)`` of the grid.
    """
    image = np.full((*shape, 3), UNANALYSED, dtype=np.uint8)
    if len(tiles):
        palette = np.array([tissue_colour(k) for k in range(probabilities.shape[1])], dtype=np.uint8)
        image[tiles[:, 0], tiles[:, 1]] = palette[probabilities.argmax(axis=1)]
    return image


def tissue_summary(probabilities: np.ndarray, names: Sequence[str]) -> dict:
    """Per class of the (M, K) softmax of M analysed tiles: ``fractions`` (of the tiles predicted that class) and
    ``mean_probabilities``, with ``tiles`` (M), ``classes`` and their ``colours``, keyed by class name."""
    m, k = probabilities.shape
    labels = [tissue_name(names, i) for i in range(k)]
    counts = np.bincount(probabilities.argmax(axis=1), minlength=k) if m else np.zeros(k, np.int64)
    means = probabilities.astype(np.float64).mean(axis=0) if m else np.zeros(k)
    return {"tiles": int(m), "classes": labels,
            "colours": {n: list(tissue_colour(i)) for i, n in enumerate(labels)},
            "fractions": {n: round(float(c) / max(m, 1), 6) for n, c in zip(labels, counts)},
            "mean_probabilities": {n: round(float(p), 6) for n, p in zip(labels, means)}}
