"""One tile's network maps -> the nuclei this tile keeps, in slide coordinates (run in worker processes).

Pure numpy: importing this module does not import torch, so post-processing workers stay small.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .cell_table import CellTable
from ..nuclei.postprocess import hovernet_postprocess, nuclei_from_instance_map
from .tiling import TileGrid

__all__ = ["PredictedMaps", "TileMaps", "tile_cells"]


@dataclass
class TileMaps:
    """The network's maps for one tile.

    Attributes:
        row, col: the tile's place in the grid.
        nuclei_prob: (T, T) float32 probability of the nucleus class.
        hv_map: (2, T, T) float32 horizontal and vertical maps.
        type_map: (T, T) uint8 per-pixel class (argmax of the type branch, 0 background), or None.
        num_classes: number of classes of the type branch, background included.
        features: (D, T/16, T/16) float32 bottleneck map for embeddings, or None.
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
        features: (B, D, T/16, T/16) float32 bottleneck map (the adapter's fused map for CellVTA), or None.
        inst_map: (B, T, T) int32 instances (1..N per tile) when the predictor segments them itself
            (post-processing is then skipped), or None.
    """

    nuclei_prob: np.ndarray
    hv_map: np.ndarray
    type_map: np.ndarray
    features: np.ndarray | None = None
    inst_map: np.ndarray | None = None


def _embeddings(features: np.ndarray, boxes: np.ndarray, tile_size: int) -> np.ndarray:
    """(N, D) mean token over each box (tile pixels ``[y0, x0, y1, x1]``), the box scaled to the token grid
    with floor for its start and ceiling for its stop."""
    cell = tile_size / features.shape[-1]
    start = np.floor(boxes[:, :2] / cell).astype(int)
    stop = np.maximum(np.ceil(boxes[:, 2:] / cell).astype(int), start + 1)
    return np.stack([features[:, a:c, b:d].mean(axis=(1, 2)) for (a, b), (c, d) in zip(start, stop)]
                    ) if len(boxes) else np.zeros((0, features.shape[0]), np.float32)


def tile_cells(maps: TileMaps, grid: TileGrid, magnification: int = 40) -> CellTable:
    """Post-process one tile (unless it comes segmented) and keep the nuclei it owns (:meth:`TileGrid.owned`).

    Nuclei typed background (every pixel of the nucleus voted background) are dropped when types are given.

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
    if type_prob is not None:
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
                   else _embeddings(maps.features, boxes[index], grid.size).astype(np.float32)),
    )
