"""Columnar table of nuclei found on a slide, as stored between the stages of whole-slide inference."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from ..files import atomic_path

__all__ = ["CellTable"]


@dataclass
class CellTable:
    """N nuclei in analysed-image pixels (the slide at analysis resolution).

    Attributes:
        tile: (N, 2) int32 ``(row, col)`` of the tile that kept the nucleus.
        box: (N, 4) int32 ``[y0, x0, y1, x1]`` bounding box, stop exclusive.
        centroid: (N, 2) float64 ``(x, y)`` centre of mass.
        type: (N,) int16 class id (0 background).
        probability: (N,) float32 fraction of the nucleus's pixels voting for ``type``.
        area: (N,) int32 pixels.
        contour_xy: (M, 2) int32 ``(x, y)`` outer-contour vertices of all nuclei, one after the other.
        contour_start: (N + 1,) int64 nucleus ``i``'s vertices are ``contour_xy[contour_start[i]:contour_start[i+1]]``.
        embedding: (N, D) float32 the embedding source's map pooled over the nucleus
            (:func:`.tile_cells.pool_features`; D = 0 when not requested).
    """

    tile: np.ndarray
    box: np.ndarray
    centroid: np.ndarray
    type: np.ndarray
    probability: np.ndarray
    area: np.ndarray
    contour_xy: np.ndarray
    contour_start: np.ndarray
    embedding: np.ndarray

    def __len__(self) -> int:
        return int(self.type.shape[0])

    @classmethod
    def empty(cls, embedding_dim: int = 0) -> CellTable:
        """No nuclei."""
        return cls(
            tile=np.zeros((0, 2), np.int32),
            box=np.zeros((0, 4), np.int32),
            centroid=np.zeros((0, 2), np.float64),
            type=np.zeros(0, np.int16),
            probability=np.zeros(0, np.float32),
            area=np.zeros(0, np.int32),
            contour_xy=np.zeros((0, 2), np.int32),
            contour_start=np.zeros(1, np.int64),
            embedding=np.zeros((0, embedding_dim), np.float32),
        )

    def contour(self, i: int) -> np.ndarray:
        """(K, 2) int32 contour of nucleus ``i``."""
        return self.contour_xy[self.contour_start[i] : self.contour_start[i + 1]]

    def select(self, keep: np.ndarray) -> CellTable:
        """The rows where the (N,) bool ``keep`` is true, in order."""
        index = np.flatnonzero(keep)
        lengths = np.diff(self.contour_start)[index]
        start = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        vertices = np.arange(start[-1]) - np.repeat(start[:-1] - self.contour_start[index], lengths)
        return CellTable(tile=self.tile[index], box=self.box[index], centroid=self.centroid[index],
                         type=self.type[index], probability=self.probability[index], area=self.area[index],
                         contour_xy=self.contour_xy[vertices],
                         contour_start=start,
                         embedding=self.embedding[index])

    @classmethod
    def concat(cls, tables: Sequence[CellTable]) -> CellTable:
        """All rows of ``tables``, in order."""
        if not tables:
            return cls.empty()
        starts = [tables[0].contour_start[:1]]
        shift = 0
        for t in tables:
            starts.append(t.contour_start[1:] + shift)
            shift += int(t.contour_start[-1])
        return cls(
            tile=np.concatenate([t.tile for t in tables]),
            box=np.concatenate([t.box for t in tables]),
            centroid=np.concatenate([t.centroid for t in tables]),
            type=np.concatenate([t.type for t in tables]),
            probability=np.concatenate([t.probability for t in tables]),
            area=np.concatenate([t.area for t in tables]),
            contour_xy=np.concatenate([t.contour_xy for t in tables]),
            contour_start=np.concatenate(starts),
            embedding=np.concatenate([t.embedding for t in tables]),
        )

    def save(self, path: Path, **extra: np.ndarray) -> None:
        """Write as an uncompressed ``.npz``, atomically, with the ``extra`` arrays beside the table's (read them
        with ``np.load``; :meth:`load` ignores them)."""
        with atomic_path(path) as tmp:
            np.savez(tmp, **extra, **{f.name: getattr(self, f.name) for f in fields(self)})

    @classmethod
    def load(cls, path: Path) -> CellTable:
        """Read a table written by :meth:`save`."""
        with np.load(path) as data:
            missing = {f.name for f in fields(cls)} - set(data.files)
            if missing:
                raise ValueError(f"{path}: not a cell table (missing {sorted(missing)})")
            return cls(**{f.name: data[f.name] for f in fields(cls)})
