"""One tile's network maps -> the nuclei this tile keeps, in slide coordinates (run in worker processes).

Pure numpy: importing this module does not import torch, so post-processing workers stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cell_table import CellTable
from ..nuclei.postprocess import hovernet_postprocess, nuclei_from_instance_map
from .tiling import TileGrid

__all__ = ["PredictedMaps", "TileMaps", "pool_features", "tile_cells"]


@dataclass
class TileMaps:
    """The network's maps for one tile.

    Attributes:
        row, col: the tile's place in the grid.
        nuclei_prob: (T, T) float32 probability of the nucleus class.
        hv_map: (2, T, T) float32 horizontal and vertical maps.
        type_map: (T, T) uint8 per-pixel class (argmax of the type branch, 0 background), or None.
        num_classes: number of classes of the type branch, background included.
        features: (D, T/s, T/s) feature map for embeddings (``s`` = 16 for ``vit``, 1 for ``decoder``,
            :mod:`scripts.cells.embeddings`), or None.
        inst_map: (T, T) int32 instances 1..N already segmented (post-processing skipped), or None.
    """

    row: int
    col: int
    nuclei_prob: np.ndarray
    hv_map: np.ndarray
    type_map: np.ndarray | None
    num_classes: int
    features: np.ndarray | None = None
    inst_map: np.ndarray | None = None


@dataclass
class PredictedMaps:
    """Maps of a batch of B tiles of side T.

    Attributes:
        nuclei_prob: (B, T, T) float32 probability of the nucleus class.
        hv_map: (B, 2, T, T) float32.
        type_map: (B, T, T) uint8 per-pixel class, 0 background.
        features: (B, D, T/s, T/s) embedding source map (``vit``: the ViT's last-block tokens, s = 16;
            ``decoder``: the decoder's last feature map, s = 1, sent as float16), or None.
        inst_map: (B, T, T) int32 instances (1..N per tile) when the predictor segments them itself
            (post-processing is then skipped), or None.
        tissue: (B, K) float32 softmax of the tissue head per tile, or None (no tissue head).
    """

    nuclei_prob: np.ndarray
    hv_map: np.ndarray
    type_map: np.ndarray
    features: np.ndarray | None = None
    inst_map: np.ndarray | None = None
    tissue: np.ndarray | None = None


def pool_features(features: np.ndarray, inst_map: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Mean feature of each nucleus: the numpy twin of :func:`scripts.cells.embeddings.pool_cells` (the
    post-processing workers do not import torch).

    Args:
        features: (D, h, w) map at ``1/s`` of the instance map's resolution (``s = T / h = T / w``, integer).
        inst_map: (T, T) integer instance ids, 0 background.
        ids: (N,) instance ids to pool, each present in ``inst_map``.

    Returns:
        (N, D) float32: ``sum_t n_t f_t / sum_t n_t`` where ``n_t`` counts the nucleus' pixels inside cell ``t``
        of the feature grid.
    """
    d, h, w = features.shape
    height, width = inst_map.shape
    if height % h or width % w or height // h != width // w:
        raise ValueError(f"feature map {h}x{w} is not an integer fraction of the instance map {height}x{width}")
    if not len(ids):
        return np.zeros((0, d), np.float32)
    s = height // h
    lookup = np.full(int(inst_map.max()) + 1, -1, dtype=np.int64)
    lookup[ids] = np.arange(len(ids))
    rows = lookup[inst_map]
    ys, xs = np.nonzero(rows >= 0)
    pairs, counts = np.unique(rows[ys, xs] * (h * w) + (ys // s) * w + xs // s, return_counts=True)
    cell, token = np.divmod(pairs, h * w)
    weighted = features.reshape(d, h * w)[:, token].T.astype(np.float64) * counts[:, None]
    first = np.searchsorted(cell, np.arange(len(ids)))
    sums = np.add.reduceat(weighted, first, axis=0)
    return (sums / np.add.reduceat(counts, first)[:, None]).astype(np.float32)


def tile_cells(maps: TileMaps, grid: TileGrid, magnification: int = 40, drop_background: bool = True) -> CellTable:
    """Post-process one tile (unless it comes segmented) and keep the nuclei it owns (:meth:`TileGrid.owned`).

    With ``drop_background``, nuclei typed background (every pixel of the nucleus voted background) are dropped
    when types are given; without it (a cell classifier types the nuclei afterwards) every nucleus is kept.

    Raises:
        ValueError: the maps are empty (0 x 0) or not two-dimensional.

    Returns:
        The kept nuclei in analysed-image coordinates.
    """
    if maps.nuclei_prob.ndim != 2 or 0 in maps.nuclei_prob.shape:
        raise ValueError(f"tile ({maps.row}, {maps.col}): nuclei map must be a non-empty (T, T) array, "
                         f"got shape {maps.nuclei_prob.shape}")
    type_prob = None
    if maps.type_map is not None:
        type_prob = np.eye(maps.num_classes, dtype=np.uint8)[maps.type_map].transpose(2, 0, 1)
    if maps.inst_map is None:
        inst_map, nuclei = hovernet_postprocess(maps.nuclei_prob, maps.hv_map, type_prob, magnification)
    else:
        inst_map, nuclei = maps.inst_map, nuclei_from_instance_map(maps.inst_map, type_prob)
    dim = 0 if maps.features is None else maps.features.shape[0]
    if len(nuclei) == 0:
        return CellTable.empty(dim)
    x0, y0 = grid.origin(maps.row, maps.col)
    boxes = nuclei.bboxes.reshape(-1, 4).astype(np.int64)
    keep = grid.owned(boxes + np.array([y0, x0, y0, x0]), maps.row, maps.col)
    if type_prob is not None and drop_background:
        keep &= nuclei.types > 0
    index = np.flatnonzero(keep)
    contours = [nuclei.contours[i] for i in index]
    lengths = np.array([len(c) for c in contours], dtype=np.int64)
    offset = np.array([x0, y0], dtype=np.int32)
    area = np.bincount(inst_map.ravel())[nuclei.ids[index]]
    return CellTable(
        tile=np.tile(np.array([maps.row, maps.col], np.int32), (index.size, 1)),
        box=(boxes[index] + np.array([y0, x0, y0, x0])).astype(np.int32),
        centroid=nuclei.centroids[index] + offset,
        type=nuclei.types[index].astype(np.int16),
        probability=nuclei.type_probs[index].astype(np.float32),
        area=area.astype(np.int32),
        contour_xy=(np.concatenate(contours) + offset if contours else np.zeros((0, 2), np.int32)).astype(np.int32),
        contour_start=np.concatenate([[0], np.cumsum(lengths)]),
        embedding=(np.zeros((index.size, 0), np.float32) if maps.features is None
                   else pool_features(maps.features, inst_map, nuclei.ids[index])),
    )
