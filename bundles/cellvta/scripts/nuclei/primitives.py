"""Nucleus primitives shared by the data, post-processing, metrics, upscale and whole-slide code (numpy only).

One rule each, written once:

* **Type vote** (:func:`vote_types`): a nucleus takes the class most of its pixels have; ties go to the smaller
  class id. When that winner is the background (0) and at least one pixel has a foreground class, the most
  frequent foreground class wins instead, so a nucleus is typed background only when none of its pixels has a
  foreground class. This is CellViT's post-processing rule, kept by the metrics, and the dataset's cell counts
  use it too (a labelled nucleus is foreground by definition).
* **Relabelling** (:func:`relabel_sequential`): ids become 1..N in ascending order of the original ids and 0
  stays background, whether or not the map has a background pixel.
* **Centroids** (:func:`centroids`): the centre of mass (x, y) of each nucleus's pixels, computed relative to a
  per-nucleus origin (the bounding box's top-left corner, as ``cv2.moments`` of a crop) or to the tile's.
"""

from __future__ import annotations

import numpy as np

__all__ = ["centroids", "class_histogram", "compact_ids", "relabel_sequential", "vote_types"]


def class_histogram(labels: np.ndarray, pixel_types: np.ndarray, n_classes: int, ids: np.ndarray) -> np.ndarray:
    """Per-nucleus pixel count of each class, from one ``bincount``.

    Args:
        labels: (M,) non-negative instance id of each pixel.
        pixel_types: (M,) integer class of each pixel, in [0, n_classes).
        n_classes: number of classes including background.
        ids: (N,) instance ids to report, ascending (the last one is the largest).

    Returns:
        (N, n_classes) int64 counts.
    """
    if ids.size == 0:
        return np.zeros((0, n_classes), np.int64)
    codes = labels.astype(np.int64) * n_classes + pixel_types
    counts = np.bincount(codes, minlength=(int(ids[-1]) + 1) * n_classes)
    return counts.reshape(-1, n_classes)[ids]


def vote_types(counts: np.ndarray) -> np.ndarray:
    """The project's type vote (module docstring) on per-nucleus class counts.

    Args:
        counts: (N, C) pixel count of each class (column 0 background) in each nucleus.

    Returns:
        (N,) int64 class of each nucleus.
    """
    counts = np.asarray(counts)
    if counts.shape[0] == 0:
        return np.zeros(0, np.int64)
    types = counts.argmax(axis=1)
    if counts.shape[1] > 1:
        foreground = counts[:, 1:]
        use_runner_up = (types == 0) & (foreground.max(axis=1) > 0)
        types = np.where(use_runner_up, foreground.argmax(axis=1) + 1, types)
    return types.astype(np.int64)


def compact_ids(inst_map: np.ndarray) -> np.ndarray:
    """Ids of a non-negative integer map made contiguous: 1..N in ascending original-id order, 0 stays 0.

    A dense lookup when the largest id is small against the map's size, ``np.unique`` otherwise.

    Args:
        inst_map: (...) non-negative integer ids.

    Returns:
        (...) intp labels.
    """
    inst_map = np.asarray(inst_map)
    if inst_map.dtype == bool:
        return inst_map.astype(np.intp)
    if inst_map.dtype.kind not in "iu":
        raise ValueError(f"instance ids must be integers, got dtype {inst_map.dtype}")
    if inst_map.dtype.kind == "i" and inst_map.min(initial=0) < 0:
        raise ValueError(f"instance ids must be >= 0, got {inst_map.min()}")
    if inst_map.dtype != np.uint64 and int(inst_map.max(initial=0)) <= 4 * inst_map.size + 1024:
        present = np.bincount(inst_map.ravel()) > 0
        present[0] = False
        return np.take(np.cumsum(present), inst_map)
    ids, inverse = np.unique(inst_map, return_inverse=True)
    return inverse.reshape(inst_map.shape) + (ids[0] != 0)


def relabel_sequential(inst_map: np.ndarray) -> np.ndarray:
    """Instance ids renumbered 1..N in ascending original-id order (0 stays 0): (...) -> (...) int32."""
    return compact_ids(inst_map).astype(np.int32)


def centroids(
    flat: np.ndarray, labels: np.ndarray, width: int, ids: np.ndarray, origins: np.ndarray | None = None
) -> np.ndarray:
    """Centre of mass (x, y) of each nucleus from the flat indices of its pixels.

    The first moments are taken relative to each nucleus's ``origin`` and the origin added back, as
    ``cv2.moments`` on a crop whose top-left corner is the origin does (so the result is bit-identical to it);
    without origins they are taken relative to the tile's corner (the mean pixel position).

    Args:
        flat: (M,) flat indices of the foreground pixels of an (H, W) map of row length ``width``.
        labels: (M,) instance id of each of these pixels.
        width: W.
        ids: (N,) instance ids present among ``labels``, ascending.
        origins: (N, 2) int (row, col) per nucleus, e.g. its bounding box's top-left corner, or None.

    Returns:
        (N, 2) float64 (x, y).
    """
    if ids.size == 0:
        return np.zeros((0, 2), np.float64)
    rows, cols = np.divmod(flat, width)
    size = int(ids[-1]) + 1
    area = np.bincount(labels, minlength=size)[ids].astype(np.float64)
    m10 = np.bincount(labels, weights=cols, minlength=size)[ids]
    m01 = np.bincount(labels, weights=rows, minlength=size)[ids]
    if origins is None:
        return np.stack([m10 / area, m01 / area], axis=1)
    m10 = m10 - origins[:, 1] * area
    m01 = m01 - origins[:, 0] * area
    return np.stack([m10 / area + origins[:, 1], m01 / area + origins[:, 0]], axis=1)
