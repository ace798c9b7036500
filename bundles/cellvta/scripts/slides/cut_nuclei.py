"""Nuclei wider than the tile overlap: no tile sees them whole, so each tile that cuts one keeps its fragment
(:meth:`.tiling.TileGrid.owned`); here the fragments of one nucleus are found across tiles and only the largest
is kept.

Two fragments from different tiles belong to one nucleus when, inside the area both tiles see, they cover the
same pixels: their intersection there is at least half of the smaller one's part there. Touching neighbours share
at most their boundary and stay apart.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import shapely

from .cell_table import CellTable
from .tiling import TileGrid

__all__ = ["cut_by_tile", "duplicate_fragments"]

SAME_NUCLEUS_OVERLAP = 0.5  # of the smaller fragment's part in the area both tiles see


def cut_by_tile(table: CellTable, grid: TileGrid) -> np.ndarray:
    """(N,) bool: the nuclei whose box reaches a border of their tile that is not the image's edge."""
    y0, x0, y1, x1 = table.box.T.astype(np.int64)
    top = table.tile[:, 0].astype(np.int64) * grid.stride
    left = table.tile[:, 1].astype(np.int64) * grid.stride
    return (((y0 <= top) & (top > 0)) | ((y1 >= top + grid.size) & (top + grid.size < grid.height))
            | ((x0 <= left) & (left > 0)) | ((x1 >= left + grid.size) & (left + grid.size < grid.width)))


def duplicate_fragments(tables: Iterable[CellTable], grid: TileGrid) -> dict[int, np.ndarray]:
    """The fragments to leave out: per table (a slide's parts, in order), the row indices of cut nuclei another
    tile's larger fragment of the same nucleus replaces (ties keep the first)."""
    where, tiles, areas, polygons = [], [], [], []
    for k, table in enumerate(tables):
        for i in np.flatnonzero(cut_by_tile(table, grid) & (np.diff(table.contour_start) >= 3)):
            where.append((k, int(i)))
            tiles.append(table.tile[i])
            areas.append(int(table.area[i]))
            polygons.append(shapely.make_valid(shapely.Polygon(table.contour(i))))
    if len(where) < 2:
        return {}
    parent = list(range(len(where)))

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    tree = shapely.STRtree(polygons)
    pairs = tree.query(polygons, predicate="intersects")
    for a, b in pairs.T[pairs[0] < pairs[1]]:
        if not np.array_equal(tiles[a], tiles[b]) and _same_nucleus(polygons[a], polygons[b], tiles[a], tiles[b],
                                                                      grid):
            parent[root(b)] = root(a)
    best: dict[int, int] = {}
    for n in range(len(where)):
        r = root(n)
        if r not in best or areas[n] > areas[best[r]]:
            best[r] = n
    dropped: dict[int, list[int]] = {}
    for n, (k, i) in enumerate(where):
        if best[root(n)] != n:
            dropped.setdefault(k, []).append(i)
    return {k: np.asarray(rows, dtype=np.int64) for k, rows in dropped.items()}


def _same_nucleus(a: shapely.Geometry, b: shapely.Geometry, tile_a: np.ndarray, tile_b: np.ndarray,
                  grid: TileGrid) -> bool:
    """Whether fragments ``a`` and ``b`` of tiles ``tile_a`` and ``tile_b`` cover the same pixels where both tiles
    see the image."""
    (xa, ya), (xb, yb) = grid.origin(*tile_a), grid.origin(*tile_b)
    shared = shapely.box(max(xa, xb), max(ya, yb), min(xa, xb) + grid.size, min(ya, yb) + grid.size)
    part_a, part_b = a.intersection(shared), b.intersection(shared)
    smaller = min(part_a.area, part_b.area)
    return smaller > 0 and part_a.intersection(part_b).area >= SAME_NUCLEUS_OVERLAP * smaller
