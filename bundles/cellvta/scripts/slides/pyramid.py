"""Writing pyramidal tiled TIFF slides that OpenSlide and tifffile both read (level 0 plus reduced levels as
consecutive IFDs, resolution in the TIFF tags), streamed tile by tile so a slide larger than memory can be
written. Used to turn an image, or a mosaic repeated to slide size, into a slide.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from ..files import atomic_path

__all__ = ["PeriodicImage", "write_pyramidal_tiff"]


@dataclass
class PeriodicImage:
    """An image of ``height`` x ``width`` pixels made by repeating ``pattern`` ((h, w, 3) uint8) in both directions."""

    pattern: np.ndarray
    height: int
    width: int

    def region(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, 3) pixels at ``(y, x)``; white beyond the image."""
        ph, pw = self.pattern.shape[:2]
        rows, cols = np.arange(y, y + h), np.arange(x, x + w)
        out = self.pattern[(rows % ph)[:, None], (cols % pw)[None, :]]
        out[rows >= self.height] = 255
        out[:, cols >= self.width] = 255
        return out

    def reduced(self, factor: int) -> PeriodicImage:
        """The image downsampled by ``factor`` (area averaging). A repeated pattern's sides must be multiples of it."""
        ph, pw = self.pattern.shape[:2]
        height, width = -(-self.height // factor), -(-self.width // factor)
        if (ph, pw) == (self.height, self.width):
            return PeriodicImage(cv2.resize(self.pattern, (width, height), interpolation=cv2.INTER_AREA), height, width)
        if ph % factor or pw % factor:
            raise ValueError(f"pattern {ph}x{pw} is not a multiple of the reduction factor {factor}")
        small = cv2.resize(self.pattern, (pw // factor, ph // factor), interpolation=cv2.INTER_AREA)
        return PeriodicImage(small, height, width)


def _tiles(image: PeriodicImage, tile: int) -> Iterator[np.ndarray]:
    for y in range(0, image.height, tile):
        for x in range(0, image.width, tile):
            yield image.region(y, x, tile, tile)


def write_pyramidal_tiff(path: str | Path, image: np.ndarray | PeriodicImage, mpp: float | None, tile: int = 256,
                         factor: int = 4, min_size: int = 512, compression: str | None = "jpeg",
                         quality: int = 90) -> None:
    """Write ``image`` as a tiled pyramidal RGB TIFF, atomically.

    Args:
        path: output ``.tif``.
        image: (H, W, 3) uint8, or a :class:`PeriodicImage`.
        mpp: microns per level-0 pixel, written as the TIFF resolution (None: no resolution tags).
        tile: TIFF tile side.
        factor: downsampling between consecutive levels.
        min_size: no level is added once the longer side is below this.
        compression: ``"jpeg"``, ``"deflate"``, ``"lzw"`` or None.
        quality: JPEG quality.
    """
    path = Path(path)
    level = image if isinstance(image, PeriodicImage) else PeriodicImage(np.ascontiguousarray(image), *image.shape[:2])
    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    if compression == "jpeg":
        options["compressionargs"] = {"level": quality}
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as writer:
        downsample = 1
        while True:
            resolution = {} if mpp is None else {"resolution": (1e4 / (mpp * downsample),) * 2,
                                                 "resolutionunit": "CENTIMETER"}
            writer.write(_tiles(level, tile), shape=(level.height, level.width, 3), dtype=np.uint8,
                         subfiletype=0 if downsample == 1 else 1, **resolution, **options)
            if max(level.height, level.width) // factor < min_size:
                break
            level = level.reduced(factor)
            downsample *= factor
