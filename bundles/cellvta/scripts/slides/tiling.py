"""Overlapping tiles over a slide, and which tile keeps each nucleus.

The slide is analysed on a grid of ``size`` x ``size`` tiles whose neighbours overlap by ``overlap`` pixels
(stride ``size - overlap``), in pixels of the analysis resolution. Tiles without tissue are not processed.

A nucleus near a tile border is seen by several tiles, whole by some and cut by others. It is kept exactly
once, by the processed tile that contains its bounding box with the widest margin (:meth:`TileGrid.owned`):

* a tile *contains* a nucleus when the box lies inside it without touching one of its inner sides (a side
  on the slide's edge is not a cut);
* the margin on each axis is the distance from the box to the nearer side of the tile (a side on the slide's
  edge counts as ``size``); tiles are ranked by their smaller margin, then by the sum of both, then by
  position (row-major), so every tile reaches the same decision about the same nucleus independently;
* a nucleus that no processed tile contains (wider than the overlap) reaches each tile cut, as a fragment with
  its own box; each tile keeps its fragment when its box centre is farthest from that tile's sides, so several
  tiles may keep one: :mod:`.cut_nuclei` finds those fragments across tiles and keeps the largest.

Every decision depends only on the nucleus's bounding box in slide coordinates, so it needs no communication
between tiles and is the same in an interrupted and an uninterrupted run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = ["TileGrid"]


@dataclass(frozen=True)
class TileGrid:
    """Tiles over an image of ``width`` x ``height`` pixels.

    Attributes:
        width, height: the analysed image (slide at analysis resolution), in pixels.
        size: tile side.
        overlap: pixels shared by neighbouring tiles (less than ``size``).
        processed: (rows, cols) bool, the tiles that are analysed (all when None).
    """

    width: int
    height: int
    size: int = 256
    overlap: int = 64
    processed: np.ndarray | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.size:
            raise ValueError(f"overlap must be in [0, size), got overlap {self.overlap} for size {self.size}")
        if self.width < 1 or self.height < 1:
            raise ValueError(f"empty image: {self.width} x {self.height}")
        if self.processed is None:
            object.__setattr__(self, "processed", np.ones(self.shape, dtype=bool))
        elif self.processed.shape != self.shape:
            raise ValueError(f"processed mask has shape {self.processed.shape}, the grid {self.shape}")

    @property
    def stride(self) -> int:
        return self.size - self.overlap

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the grid."""
        return self._count(self.height), self._count(self.width)

    def _count(self, extent: int) -> int:
        return max(1, math.ceil((extent - self.overlap) / self.stride))

    def origin(self, row: int, col: int) -> tuple[int, int]:
        """``(x, y)`` of the top-left pixel of tile ``(row, col)``."""
        return col * self.stride, row * self.stride

    def with_processed(self, processed: np.ndarray) -> TileGrid:
        """The same grid analysing only the tiles where ``processed`` (rows, cols) is True."""
        return TileGrid(self.width, self.height, self.size, self.overlap, np.asarray(processed, dtype=bool))

    def tissue_tiles(self, mask: np.ndarray, pixels_per_mask_pixel: float, min_fraction: float) -> np.ndarray:
        """(rows, cols) bool: tiles whose footprint holds at least ``min_fraction`` of tissue (and any tissue),
        and their neighbours that hold any tissue, so that nuclei at the edge of the tissue are seen whole.

        Args:
            mask: (h, w) bool tissue mask of the analysed image at a lower resolution.
            pixels_per_mask_pixel: analysed-image pixels per mask pixel.
            min_fraction: lowest tissue fraction of a tile's footprint.
        """
        integral = np.pad(np.cumsum(np.cumsum(mask, 0, dtype=np.int64), 1), ((1, 0), (1, 0)))
        rows, cols = self.shape
        ys = np.arange(rows) * self.stride / pixels_per_mask_pixel
        xs = np.arange(cols) * self.stride / pixels_per_mask_pixel
        extent = self.size / pixels_per_mask_pixel
        y0 = np.clip(np.floor(ys).astype(int), 0, mask.shape[0])
        y1 = np.clip(np.ceil(ys + extent).astype(int), 0, mask.shape[0])
        x0 = np.clip(np.floor(xs).astype(int), 0, mask.shape[1])
        x1 = np.clip(np.ceil(xs + extent).astype(int), 0, mask.shape[1])
        area = integral[y1][:, x1] - integral[y0][:, x1] - integral[y1][:, x0] + integral[y0][:, x0]
        footprint = np.maximum(np.outer(y1 - y0, x1 - x0), 1)
        tissue = (area > 0) & (area >= min_fraction * footprint)
        return ndimage.binary_dilation(tissue, np.ones((3, 3), bool)) & (area > 0)

    def _margins(self, start: np.ndarray, stop: np.ndarray, index: np.ndarray, extent: int) -> np.ndarray:
        """Margins of spans ``[start, stop)`` in tiles ``index`` along one axis; -1 where not contained."""
        lo = index * self.stride
        hi = lo + self.size
        valid = (index >= 0) & (index < self._count(extent))
        before = np.where(lo > 0, start - lo, self.size)
        after = np.where(hi < extent, hi - stop, self.size)
        margin = np.minimum(before, after)
        return np.where(valid & (start >= lo) & (stop <= hi) & (margin > 0), margin, -1)

    def _best(self, y0: np.ndarray, x0: np.ndarray, y1: np.ndarray, x1: np.ndarray) -> np.ndarray:
        """(N, 2) ``(row, col)`` of the best processed tile containing each box, ``(-1, -1)`` if none."""
        reach = -(-self.size // self.stride)
        offsets = np.arange(-reach, 1)
        rows = (y0 // self.stride)[:, None] + offsets[None, :]
        cols = (x0 // self.stride)[:, None] + offsets[None, :]
        my = self._margins(y0[:, None], y1[:, None], rows, self.height)
        mx = self._margins(x0[:, None], x1[:, None], cols, self.width)
        n_rows, n_cols = self.shape
        best = np.full((y0.size, 2), -1, dtype=np.int64)
        best_score = np.full(y0.size, -1, dtype=np.int64)
        for a in range(offsets.size):  # ascending rows, then columns: ties keep the first tile
            for b in range(offsets.size):
                r, c = rows[:, a], cols[:, b]
                inside = (my[:, a] > 0) & (mx[:, b] > 0)
                inside &= self.processed[np.clip(r, 0, n_rows - 1), np.clip(c, 0, n_cols - 1)]
                score = np.minimum(my[:, a], mx[:, b]) * (4 * self.size) + my[:, a] + mx[:, b]
                better = inside & (score > best_score)
                best[better] = np.stack([r[better], c[better]], axis=1)
                best_score[better] = score[better]
        return best

    def owned(self, boxes: np.ndarray, row: int, col: int) -> np.ndarray:
        """Which nuclei, as seen by tile ``(row, col)``, this tile keeps.

        Args:
            boxes: (N, 4) int ``[y0, x0, y1, x1]`` bounding boxes (stop exclusive) in analysed-image pixels.
            row, col: the tile that segmented them.

        Returns:
            (N,) bool.
        """
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        y0, x0, y1, x1 = boxes.T
        best = self._best(y0, x0, y1, x1)
        uncontained = best[:, 0] < 0
        if uncontained.any():
            cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
            best[uncontained] = self._best(cy, cx, cy + 1, cx + 1)[uncontained]
        return (best[:, 0] == row) & (best[:, 1] == col)
