"""The ground-truth oracle: what a perfect model would give for known instance and type maps.

:class:`GroundTruthPredictor` stands in for :class:`scripts.slides.predictors.NetworkPredictor` in the
whole-slide tests and benchmarks. It returns either the instances themselves (so post-processing is skipped
and what comes out of the whole-slide pipeline must be the ground truth: it validates and benchmarks tiling,
merging and writing independently of any network), or the network-style maps (so the HoVer-Net
post-processing runs on ideal maps). It takes ``(B, T, T, 3)`` uint8 RGB tiles and their top-left ``(x, y)``
in analysed-image pixels and returns :class:`scripts.slides.tile_cells.PredictedMaps`.
"""

from __future__ import annotations

import numpy as np

from scripts.data.transforms import hv_maps
from scripts.nuclei.primitives import relabel_sequential
from scripts.slides.tile_cells import PredictedMaps

__all__ = ["GroundTruthPredictor"]


class GroundTruthPredictor:
    """The maps of a ground-truth instance/type map, cut at each tile's place.

    Args:
        inst_map: (H, W) int instance ids of the analysed image (0 background).
        type_map: (H, W) int class ids (0 background).
        num_classes: class count, background included.
        periodic: the image repeats ``inst_map`` in both directions (a slide tiled with a mosaic);
            otherwise everything outside ``inst_map`` is background.
        instances: return the instances (post-processing skipped) rather than only the maps.
    """

    def __init__(self, inst_map: np.ndarray, type_map: np.ndarray, num_classes: int, periodic: bool = False,
                 instances: bool = True) -> None:
        if inst_map.shape != type_map.shape or inst_map.ndim != 2:
            raise ValueError(f"inst_map {inst_map.shape} and type_map {type_map.shape} must be the same (H, W)")
        self.num_classes = num_classes
        self.embeddings = False
        self.periodic = periodic
        self.instances = instances
        self._inst = inst_map.astype(np.int64)
        self._nuclei = (inst_map > 0).astype(np.float32)
        self._hv = hv_maps(inst_map)
        self._types = type_map.astype(np.uint8)

    def _cut(self, array: np.ndarray, x: int, y: int, size: int) -> np.ndarray:
        h, w = array.shape[-2:]
        rows, cols = np.arange(y, y + size), np.arange(x, x + size)
        if self.periodic:
            return array[..., (rows % h)[:, None], (cols % w)[None, :]]
        out = np.zeros((*array.shape[:-2], size, size), dtype=array.dtype)
        r, c = rows[(rows >= 0) & (rows < h)], cols[(cols >= 0) & (cols < w)]
        if r.size and c.size:
            out[..., r[0] - y : r[-1] + 1 - y,
                c[0] - x : c[-1] + 1 - x] = array[..., r[0] : r[-1] + 1, c[0] : c[-1] + 1]
        return out

    def __call__(self, tiles: np.ndarray, origins: np.ndarray) -> PredictedMaps:
        size = tiles.shape[1]
        origins = np.asarray(origins).tolist()
        cuts = [(self._cut(self._nuclei, x, y, size), self._cut(self._hv, x, y, size),
                 self._cut(self._types, x, y, size)) for x, y in origins]
        maps = PredictedMaps(*(np.stack(parts) for parts in zip(*cuts)))
        if self.instances:
            maps.inst_map = np.stack([relabel_sequential(self._cut(self._inst, x, y, size)) for x, y in origins])
        return maps
